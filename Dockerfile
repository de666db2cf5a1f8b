FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
# Static assets (admin, API docs) are collected at build time and served by WhiteNoise.
RUN mkdir -p /var/lib/cao/metrics && SECRET_KEY=build-only CAO_CHECK_BACKENDS_ON_START=false python manage.py collectstatic --noinput -v 0 \
    && useradd --system --uid 1000 --home-dir /app cao \
    && chown -R cao /app /var/lib/cao

USER cao
EXPOSE 8000
ENTRYPOINT ["/app/docker-entrypoint.sh"]
CMD ["api"]
