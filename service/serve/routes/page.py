"""GET /: the web page (static HTML, CSS and JS in service/serve/static)."""

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.serve.gallery import STATIC

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
