"""HTTP routes, one router per resource."""

from service.serve.routes import detect, health, metrics, model, page

ROUTERS = (detect.router, health.router, metrics.router, model.router, page.router)
