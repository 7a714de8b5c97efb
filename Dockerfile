# The sagaworks worker and CLI, installed from uv.lock.
FROM python:3.11-slim
RUN pip install --no-cache-dir "uv>=0.13,<0.14"
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
COPY sagas ./sagas
RUN uv sync --frozen --no-dev && useradd --system --uid 10001 sagaworks
ENV PATH="/app/.venv/bin:$PATH"
USER sagaworks
# The worker runs the saga modules named in SAGAWORKS_SAGAS and refuses to start without one.
CMD ["sagaworks", "worker"]
