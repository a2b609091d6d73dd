"""HTTP routes, one router per resource."""

from service.serve.routes import detect, health, metrics, model, oip, page

ROUTERS = (detect.router, health.router, metrics.router, model.router, oip.router, page.router)
