# The ehr-worker image: one image for the Celery worker, the Kafka consumer and model builds.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    EHRW_MODEL_REGISTRY=/registry
WORKDIR /app

# torch first and pinned to the CPU wheel index, so nothing pulls the CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml constraints.txt README.md ./
COPY schemas ./schemas
COPY models ./models
COPY connectors ./connectors
COPY training ./training
COPY workers ./workers
RUN pip install -c constraints.txt ".[train,ops]"

RUN useradd --create-home --uid 10001 ehrw && mkdir -p /registry && chown ehrw /registry
USER ehrw
CMD ["celery", "-A", "workers", "worker", "--loglevel", "INFO"]
