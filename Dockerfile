# Two images from one file; docker-compose.yml picks the target per service:
#   web  the slim image (requirements/base.txt, no torch): web, beat, sources, migrate and
#        every worker pool but `inference`.
#   ml   the inference pool's image (requirements/ml.txt: the same set plus torch,
#        transformers and ONNX Runtime). Its torch is the package index's default wheel
#        for Linux x86_64, which is CUDA-enabled (worker-inference-gpu needs it) and runs
#        on the CPU too.
#   docker build --target web -t twiscope:latest .
#   docker build --target ml -t twiscope-ml:latest .
# Both install their lock with --require-hashes. Neither carries the development package,
# the tests or the benchmarks (.dockerignore).

FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN groupadd --system twiscope \
 && useradd --system --gid twiscope --home-dir /app --no-create-home twiscope

FROM runtime AS web

# Dependencies first: this layer is rebuilt only when the lock changes.
COPY requirements/base.txt requirements/base.txt
RUN pip install --require-hashes -r requirements/base.txt

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

FROM runtime AS ml

# ml.txt holds base.txt's packages at the same versions, plus the models' packages: one
# install, rebuilt only when that lock changes (not when the source does).
COPY requirements/ml.txt requirements/ml.txt
RUN pip install --require-hashes -r requirements/ml.txt

# The same source and static files as the slim image.
COPY --from=web /app /app
RUN mkdir -p .run /models \
 && chown twiscope:twiscope .run /models

# No CMD of its own: docker-compose.yml gives the inference pools their command.
USER twiscope
