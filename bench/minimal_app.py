"""The baseline: the least FastAPI handler that scores the same model (no validation, no bus)."""

import argparse
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.core.registry import LoadedModel


def build(model_dir: Path) -> FastAPI:
    model = LoadedModel.from_directory(model_dir)
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})

    @app.post("/v1/predictions")
    async def predict(body: dict[str, Any]) -> dict[str, Any]:
        x = model.encode_many([body["features"]])
        return model.prediction(model.predict_margins(x)[0]).model_dump(mode="json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        build(args.model_dir),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        proxy_headers=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
