# twoway: the worker as a container image.
#
#   docker build -t twoway .
#   docker run -d --name twoway \
#     -v "$PWD/config:/app/config:ro" -v twoway-data:/app/data \
#     -e IMAP_PASSWORD -e SMTP_PASSWORD twoway
#
# The config is read from /app/config/twoway.yaml (start from twoway.example.yaml);
# templates from /app/templates (mount your own over it). With no TWOWAY_DATABASE_URL of
# your own the database is SQLite in the /app/data volume; docker-compose.example.yml
# runs it on PostgreSQL instead.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /tmp/src

# Dependencies alone, read from pyproject.toml: this layer is rebuilt when they change,
# not on every edit of the code. psycopg is included so PostgreSQL works out of the box.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

# Then twoway itself, without touching the dependencies installed above.
# templates/ and config/ ship inside the package too (`twoway demo`, `twoway init`).
COPY README.md ./
COPY worker/ ./worker/
COPY templates/ ./templates/
COPY config/ ./config/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /tmp/src

# A fixed numeric uid, so orchestrators can check runAsNonRoot and volumes can be
# prepared with the right owner.
RUN groupadd --system --gid 10001 twoway \
    && useradd --system --uid 10001 --gid twoway --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin twoway \
    && mkdir -p /app/config /app/templates /app/data \
    && chown twoway:twoway /app/data

WORKDIR /app
# Owned by root and read-only to the worker: it reads config and templates, never writes.
COPY config/twoway.example.yaml /app/config/
COPY templates/ /app/templates/

# TWOWAY_DATABASE_URL overrides the config's `database` key; set it to the empty string
# to use the key instead. /app/config/twoway.yaml finds /app/templates on its own
# (`templates/` beside the config folder).
ENV TWOWAY_CONFIG=/app/config/twoway.yaml \
    TWOWAY_DATABASE_URL=sqlite:////app/data/twoway.db

VOLUME ["/app/config", "/app/templates", "/app/data"]

USER 10001:10001

# `twoway status --check` exits non-zero unless a worker has heartbeated within its lease
# and no mailbox has been failing for longer than alarms.mailbox_failing_seconds (the
# same answer as `twoway serve`'s /healthz, which the compose example's web service uses).
HEALTHCHECK --interval=60s --timeout=30s --start-period=60s --retries=3 \
    CMD ["twoway", "status", "--check"]

# `twoway serve --host 0.0.0.0` (the compose example's web service) listens here.
EXPOSE 8080

# SIGTERM (docker stop) lets the message in flight finish; give it a grace period.
STOPSIGNAL SIGTERM
CMD ["twoway", "run"]
