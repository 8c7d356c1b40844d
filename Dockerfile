# One image for every Twiscope service (web, each worker pool, beat, migrate); the
# command is chosen per service in docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Extra pip options, e.g. an index or find-links for CPU-only torch wheels in images
# that will never see a GPU. The default torch wheel for Linux x86_64 is CUDA-enabled,
# which the optional GPU inference pool (worker-inference-gpu) needs.
ARG PIP_INSTALL_ARGS=""

WORKDIR /app
RUN groupadd --system twiscope \
 && useradd --system --gid twiscope --home-dir /app --no-create-home twiscope

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install ${PIP_INSTALL_ARGS} -r requirements.txt

COPY . .
# Static files are part of the image (served by WhiteNoise). Settings insist on these
# variables; nothing here connects to them, and none of them reaches a running container.
RUN SECRET_KEY=collectstatic-only-not-a-secret \
    DATABASE_URL=postgres://unused@localhost/unused \
    REDIS_URL=redis://localhost:6379/0 \
    python manage.py collectstatic --noinput --verbosity 0 \
 && mkdir -p .run /models \
 && chown twiscope:twiscope .run /models

USER twiscope
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "twiscope.asgi:application"]
