# syntax=docker/dockerfile:1
# One image for every HelixNet Core process; docker compose picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 helix \
    && useradd --system --uid 10001 --gid helix --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin helix

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a code change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# .dockerignore lets through only the packages, migrations and build metadata.
COPY . ./
# Editable, so the code stays in /app beside alembic.ini and migrations/, where
# `python -m command_api.setup` looks for them; the files stay owned by root.
RUN pip install --no-deps --editable .

USER helix:helix
EXPOSE 8000

# Both APIs behind one port; the Compose stack runs each process on its own instead.
# Run alone, the image trusts no X-Forwarded-For (a client could pick the address
# sign-ins are throttled by); behind a proxy, add --proxy-headers and
# --forwarded-allow-ips naming the proxy, as the Compose stack does for Traefik.
CMD ["uvicorn", "gateway.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
