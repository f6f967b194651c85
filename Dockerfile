# Pombo's image: `docker build -t pombo .`; docker-compose.yml runs two of it.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed uid, so that a volume or a file can be granted to it; /data is its alone.
RUN groupadd --system --gid 10001 pombo \
    && useradd --system --uid 10001 --gid pombo --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pombo \
    && install -d -o pombo -g pombo -m 0700 /data

WORKDIR /app
# Dependencies first: their layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# The code stays root's, read-only to the app; compiled once here, not on every start.
COPY *.py ./
COPY migrations ./migrations
COPY dashboard ./dashboard
RUN python -m compileall -q .

ENV POMBO_HOST=0.0.0.0 \
    POMBO_PORT=8000 \
    POMBO_DATA_DIR=/data \
    POMBO_ENVIRONMENT=production
VOLUME /data
EXPOSE 8000
USER 10001:10001

# Liveness only: /readyz is 503 while the database is away, and a restart would not bring it back.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('POMBO_PORT', '8000'), timeout=2)"]

CMD ["python", "main.py", "serve"]
