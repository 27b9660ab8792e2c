"""The HTTP layer over the recogniser core (which knows nothing of HTTP).

  schemas.py   request and response models (the OpenAPI schema) and conversions to them
  deps.py      the loaded state and settings as FastAPI dependencies
  auth.py      auth policy: bearer keys, the admin key, workspace access, the key throttle
  errors.py    error mapping: the core's error kinds -> HTTP status and JSON body, in one place
  uploads.py   image uploads decoded under the request's limits
  routes/      one APIRouter per resource: system, workspaces, classes, inference, insight, export
  app.py       the assembly: lifespan (models and store loaded once), error handlers, routers, middleware
  serve.py     uvicorn: proxy trust, slow-client deadline, workers
"""
