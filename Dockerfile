# The gateway and the worker share one image; the command picks the role.
FROM python:3.11-slim AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY service ./service
COPY workers ./workers
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# LightGBM's library links the system's OpenMP runtime (xgboost's wheel carries its own).
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home shapstream
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY models ./models
USER shapstream
ENV SHAPSTREAM_MODELS_DIR=/app/models
EXPOSE 8000
CMD ["shapstream", "serve", "--host", "0.0.0.0", "--port", "8000"]
