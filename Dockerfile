# syntax=docker/dockerfile:1
# One base for building and running: Debian bookworm's own Python 3.11, security updates from
# Debian (the README says why). Where no registry answers, deploy/localdocker.py makes this
# base with debootstrap.
FROM debian:bookworm-slim AS base
# Debian stable moves only by security and point releases; pinning package versions would
# break the build whenever the archive drops the pinned one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Build stage: the virtualenv, exactly the locked versions, each checked against its hash.
# Wheels only, but for psycogreen, which PyPI has as source alone (pure Python: no compiler).
FROM base AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
COPY requirements.lock /tmp/requirements.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps \
        --only-binary=:all: --no-binary=psycogreen -r /tmp/requirements.lock

# Final stage: the base, the virtualenv and the code; no pip cache, no compilers, no root.
FROM base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8000
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY config/ config/
COPY service/ service/
COPY gunicorn.conf.py ./
# Numeric, so that the runtime can tell it is not root without the image's /etc/passwd.
USER 10001:10001
EXPOSE 8000
# Python's own urllib: no curl in the image. /healthz never touches the database.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
