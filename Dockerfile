FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY *.py ./
COPY migrations ./migrations
ENV POMBO_HOST=0.0.0.0 POMBO_DATA_DIR=/data POMBO_ENVIRONMENT=production
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["python", "main.py", "serve"]
