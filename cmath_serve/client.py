"""numpy arrays -> tritonclient inputs (the conversation client, the server tests and the load generators).

Object arrays of UTF-8 bytes are BYTES tensors (the raw `text` input)."""

from __future__ import annotations

from typing import Any

import numpy as np

TRITON_DTYPES = {
    np.float32: "FP32",
    np.float64: "FP64",
    np.int64: "INT64",
    np.bool_: "BOOL",
    np.object_: "BYTES",
}


def infer_inputs(module: Any, arrays: dict[str, np.ndarray]) -> list[Any]:
    """One `module.InferInput` per array (module: tritonclient.grpc or tritonclient.http), data set from numpy."""
    out = []
    for name, x in arrays.items():
        i = module.InferInput(name, list(x.shape), TRITON_DTYPES[x.dtype.type])
        i.set_data_from_numpy(x)
        out.append(i)
    return out
