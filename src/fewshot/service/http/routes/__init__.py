"""The routes, one `APIRouter` per resource; `fewshot.service.http.app` includes them."""
