"""The floor of Python HTTP serving for ``bench/serving.py``: one FastAPI route that only runs the network.

``POST /predict`` takes a JSON list of already-transformed float rows (``[[f0, ..., fd], ...]``) and returns the
class probabilities, one list per row. No authentication, validation, feature transform, routing or metrics: what
is left is the cost of uvicorn + FastAPI + JSON + one eager torch forward pass, which is the least any Python
model server on this stack can spend per request. Run by uvicorn with the model server's settings (uvloop,
httptools, one worker, one torch thread)::

    python bench/_bare_server.py --model-dir <train output> --host 127.0.0.1 --port 8780
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import orjson
import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from kiln.tasks.training.networks import load_model


def create_app(model_dir: str) -> FastAPI:
    """The app serving the trained network in ``model_dir`` (a ``train`` step output folder).

    Args:
        model_dir: folder holding ``model.pt``.

    Returns:
        A FastAPI app with ``POST /predict`` and ``GET /health``.
    """
    model = load_model(model_dir)
    module, classification = model.module, model.task == "classification"
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        # A tiny MLP takes tens of microseconds: running it on the event loop is cheaper than a thread hop.
        x = torch.from_numpy(np.asarray(orjson.loads(await request.body()), dtype=np.float32))
        with torch.inference_mode():
            out = module(x)
            y = torch.softmax(out, dim=1) if classification else out.squeeze(1)
        return Response(orjson.dumps(y.numpy(), option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a train step output folder (holds model.pt)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    uvicorn.run(create_app(args.model_dir), host=args.host, port=args.port, loop="uvloop", http="httptools",
                workers=1, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
