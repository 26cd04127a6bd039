"""cmath_serve: the exported CMATH model on a real Triton Inference Server (Python backend).

    cmath-serve runs/meld/export --http-port 8000 --grpc-port 8001

writes a Triton model repository (`repository.py`) with two models that run `cmath_runtime` inside Triton's
Python backend (`backend.py`):

* `cmath`: whole conversations, the exported graph's inputs and outputs, dynamic batching;
* `cmath_stream`: one utterance per request with Triton's sequence API (sequence_id / sequence_start /
  sequence_end); the server keeps each conversation's state (`conversations.py`) and steps many conversations
  in one batched call.

and starts the `tritonserver` binary that `nvidia-pytriton` ships (`launcher.py`). See docs/serving.md.
"""

from __future__ import annotations

from .errors import ServeError

__all__ = ["ServeError"]
