# The redcredit command line (`migrate`, `sync`, `reconcile`, `evict`) for docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# psycopg without its [binary] extra loads the system's libpq.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 \
    && rm -rf /var/lib/apt/lists/*

# Only what the wheel is built from, so edits elsewhere keep this layer cached.
COPY pyproject.toml README.md /src/
COPY redcredit /src/redcredit
COPY lua /src/lua
RUN pip install /src && rm -rf /src

RUN useradd --system --no-create-home --uid 10001 redcredit
USER redcredit

# Exec form: redcredit is PID 1 and gets the SIGTERM that `docker compose stop`
# sends, which the syncer handles by finishing its batch.
ENTRYPOINT ["redcredit"]
CMD ["--help"]
