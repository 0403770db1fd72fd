"""Keep an ONNX graph's int8 weights int8 in memory: embedding tables and the matrices of its products.

The exported text encoder (``export/text_encoder.py``) stores every large tensor as int8 with one fp32 scale
per row (embedding tables, read through ``DequantizeLinear → Gather``) or per column (the weight of a
``DequantizeLinear → MatMul``). onnxruntime folds each of those ``DequantizeLinear`` into an fp32 copy of the
tensor when the session loads (MiniLM: 47 MB of tables instead of 12, and 42 MB of matrices instead of 11).
Two rewrites keep them int8:

- ``int8_lookups``: ``Gather(int8 table) → Cast → Mul(Gather(scales))`` computes the same float32 numbers
  bit for bit (``float(q) · s``, zero point 0) for the looked-up rows only.
- ``int8_matmuls``: ``MatMulNBits`` (onnxruntime's contrib op, 8 bits, fp32 arithmetic) holds the weight
  as uint8 blocks (``q + 128``, zero point 128) with the column's scale repeated for every block, so it
  multiplies by the same dequantised weights; only the order of the fp32 sums differs (MiniLM's vectors
  move by ~1e-7) and each call dequantises the weights again (~10 ms per short text on 2 cores).

They work on the serialized bytes with a minimal protobuf wire-format reader and writer, so the runtime
needs neither the ``onnx`` package nor a second model file: the file on disk, its sha256 and the encoder's
version stay what they were. Each returns the rewritten bytes and how many tensors it rewrote (0: the
bytes unchanged); ``int8_weights`` makes both in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# protobuf field numbers (onnx.proto)
_MODEL_GRAPH, _MODEL_OPSET = 7, 8
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP, _NODE_ATTR, _NODE_DOMAIN = 1, 2, 3, 4, 5, 7
_ATTR_NAME, _ATTR_I, _ATTR_TYPE = 1, 3, 20
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 8, 9
_FLOAT, _UINT8, _INT8 = 1, 2, 3
_ATTR_INT = 2


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int = 0, end: int | None = None):
    """(field number, wire type, value, whole field as a slice) for each field of a message; ``value`` is
    an int (varint), or a (start, end) span of the payload (length-delimited and fixed-size)."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        begin = pos
        key, pos = _read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            value, pos = _read_varint(buf, pos)
        elif wt == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            value, pos = (pos, pos + n), pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, value, (begin, pos)


def _len_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _int_field(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


@dataclass
class _Node:
    span: tuple[int, int]
    op: str = ""
    domain: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    ints: dict[str, int] = field(default_factory=dict)  # INT attributes


@dataclass
class _Tensor:
    dims: list[int] = field(default_factory=list)
    dtype: int = 0
    raw: tuple[int, int] | None = None
    span: tuple[int, int] = (0, 0)  # the initializer field in the graph (key included)


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8")


def _node(buf, whole, payload) -> _Node:
    """The node whose field spans ``whole`` (key included) and whose message is ``payload``."""
    node = _Node(whole)
    for num, wt, value, _ in _fields(buf, *payload):
        if num == _NODE_INPUT:
            node.inputs.append(_text(buf, value))
        elif num == _NODE_OUTPUT:
            node.outputs.append(_text(buf, value))
        elif num == _NODE_OP:
            node.op = _text(buf, value)
        elif num == _NODE_DOMAIN:
            node.domain = _text(buf, value)
        elif num == _NODE_ATTR:
            name, i = None, None
            for anum, awt, avalue, _ in _fields(buf, *value):
                if anum == _ATTR_NAME:
                    name = _text(buf, avalue)
                elif anum == _ATTR_I:
                    i = avalue - (1 << 64) if avalue >= 1 << 63 else avalue
            if name is not None and i is not None:
                node.ints[name] = i
    return node


def _tensor(buf, span) -> tuple[str, _Tensor]:
    name, t = "", _Tensor()
    for num, wt, value, _ in _fields(buf, *span):
        if num == _TENSOR_NAME:
            name = _text(buf, value)
        elif num == _TENSOR_TYPE:
            t.dtype = value
        elif num == _TENSOR_RAW:
            t.raw = value
        elif num == _TENSOR_DIMS:
            if wt == 0:
                t.dims.append(value)
            else:  # packed
                pos = value[0]
                while pos < value[1]:
                    d, pos = _read_varint(buf, pos)
                    t.dims.append(d)
    return name, t


def _encode_node(op: str, inputs: list[str], outputs: list[str], name: str,
                 ints: dict[str, int] | None = None, domain: str = "") -> bytes:
    body = b"".join(_len_field(_NODE_INPUT, s.encode()) for s in inputs)
    body += b"".join(_len_field(_NODE_OUTPUT, s.encode()) for s in outputs)
    body += _len_field(_NODE_NAME, name.encode()) + _len_field(_NODE_OP, op.encode())
    if domain:
        body += _len_field(_NODE_DOMAIN, domain.encode())
    for k, v in (ints or {}).items():
        body += _len_field(_NODE_ATTR, _len_field(_ATTR_NAME, k.encode()) + _int_field(_ATTR_I, v)
                           + _int_field(_ATTR_TYPE, _ATTR_INT))
    return _len_field(_GRAPH_NODE, body)


def _encode_tensor(name: str, dims: list[int], dtype: int, raw) -> bytes:
    body = b"".join(_int_field(_TENSOR_DIMS, d) for d in dims) + _int_field(_TENSOR_TYPE, dtype)
    body += _len_field(_TENSOR_NAME, name.encode()) + _len_field(_TENSOR_RAW, bytes(raw))
    return _len_field(_GRAPH_INITIALIZER, body)


@dataclass
class _Graph:
    buf: memoryview
    span: tuple[int, int]  # the graph message inside the model
    nodes: list[_Node]
    inits: dict[str, _Tensor]
    producer: dict[str, _Node]
    uses: dict[str, int]

    def raw(self, t: _Tensor) -> memoryview:
        return self.buf[t.raw[0]:t.raw[1]]


def _parse(model: bytes) -> _Graph | None:
    """The model's graph (nodes, initializers, who produces and how often each value is used), or None when
    the bytes are not a well-formed model (left as they are, for onnxruntime to report)."""
    buf = memoryview(model)
    try:
        graph = next((value for num, wt, value, _ in _fields(buf) if num == _MODEL_GRAPH and wt == 2), None)
        if graph is None:
            return None
        nodes, inits = [], {}
        for num, wt, value, whole in _fields(buf, *graph):
            if num == _GRAPH_NODE:
                nodes.append(_node(buf, whole, value))
            elif num == _GRAPH_INITIALIZER:
                name, t = _tensor(buf, value)
                t.span = whole
                inits[name] = t
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    return _Graph(buf, graph, nodes, inits, {o: n for n in nodes for o in n.outputs}, uses)


def _int8_dequantized(g: _Graph, value: str, scale_dims) -> tuple[_Node, _Tensor, _Tensor] | None:
    """(DequantizeLinear node, int8 2-D weight, fp32 scale) when ``value`` is the only use of a
    ``DequantizeLinear`` of an int8 initializer with zero point 0 (or none) and ``scale_dims(q.dims, axis)``
    accepts its scale's shape; else None."""
    dq = g.producer.get(value)
    if dq is None or dq.op != "DequantizeLinear" or dq.domain or g.uses.get(value) != 1:
        return None
    q, scale = g.inits.get(dq.inputs[0]), g.inits.get(dq.inputs[1]) if len(dq.inputs) > 1 else None
    zp = g.inits.get(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
    if q is None or scale is None or q.dtype not in (_INT8, _UINT8) or len(q.dims) != 2 or q.raw is None:
        return None
    if scale.dtype != _FLOAT or scale.raw is None or (len(dq.inputs) > 2 and dq.inputs[2] and zp is None):
        return None
    if zp is not None and (zp.raw is None or any(g.raw(zp))):
        return None  # only zero points of 0: float(q) * s is then exactly what DequantizeLinear computes
    if not scale_dims(q.dims, scale.dims, dq.ints.get("axis", 1)):
        return None
    return dq, q, scale


def _splice(model: bytes, g: _Graph, replaced: dict[tuple[int, int], bytes], new_inits: list[bytes],
            opset: tuple[str, int] | None = None) -> bytes:
    """The model with node spans replaced (b"" drops one), initializers appended and, when given, an
    (operator domain, version) import added unless the model imports that domain already."""
    buf = g.buf
    pieces, pos = [], g.span[0]
    for span in sorted(replaced):
        pieces += [buf[pos:span[0]], replaced[span]]
        pos = span[1]
    pieces += [buf[pos:g.span[1]], *new_inits]
    out, domains = [], set()  # one join at the end: the model is copied once
    for num, wt, value, whole in _fields(buf):
        if num == _MODEL_GRAPH and value == g.span:
            out += [_varint(_MODEL_GRAPH << 3 | 2), _varint(sum(len(p) for p in pieces)), *pieces]
        else:
            if num == _MODEL_OPSET and wt == 2:
                domains.update(_text(buf, v) for n, w, v, _ in _fields(buf, *value) if n == _OPSET_DOMAIN)
            out.append(buf[whole[0]:whole[1]])
    if opset is not None and opset[0] not in domains:
        out.append(_len_field(_MODEL_OPSET, _len_field(_OPSET_DOMAIN, opset[0].encode())
                              + _int_field(_OPSET_VERSION, opset[1])))
    return b"".join(out)


def _lookup_rewrites(g: _Graph, replaced: dict[tuple[int, int], bytes], new_inits: list[bytes]) -> int:
    """Add to ``replaced`` (node or initializer span → its replacement; b"" drops it) and ``new_inits`` the
    rewrite of every int8 table lookup (see ``int8_lookups``); returns how many tables."""
    n_tables = 0
    for n in g.nodes:
        if n.op != "Gather" or n.domain or n.ints.get("axis", 0) != 0 or len(n.inputs) != 2:
            continue
        found = _int8_dequantized(g, n.inputs[0], lambda qd, sd, axis: (sd == [qd[0]] and axis == 0)
                                  or sd in ([], [1]))
        if found is None:
            continue
        dq, q, scale = found
        per_row = scale.dims == [q.dims[0]]
        base, ids, out = dq.outputs[0], n.inputs[1], n.outputs[0]
        rows, scales, floats = f"{base}/rows_q", f"{base}/rows_scale", f"{base}/rows_float"
        parts = [_encode_node("Gather", [dq.inputs[0], ids], [rows], f"{base}/GatherRows"),
                 _encode_node("Cast", [rows], [floats], f"{base}/CastRows", {"to": _FLOAT})]
        if per_row:  # scales as a [rows, 1] table, looked up with the same ids: broadcasts over the row
            col = f"{base}/scale_column"
            new_inits.append(_encode_tensor(col, [q.dims[0], 1], _FLOAT, g.raw(scale)))
            parts += [_encode_node("Gather", [col, ids], [scales], f"{base}/GatherScales"),
                      _encode_node("Mul", [floats, scales], [out], f"{base}/ScaleRows")]
        else:
            parts.append(_encode_node("Mul", [floats, dq.inputs[1]], [out], f"{base}/ScaleRows"))
        replaced[dq.span], replaced[n.span] = b"", b"".join(parts)
        n_tables += 1
    return n_tables


def _matmul_rewrites(g: _Graph, replaced: dict[tuple[int, int], bytes], new_inits: list[bytes],
                     block_size: int = 128) -> int:
    """As ``_lookup_rewrites``, for every int8 matrix product (see ``int8_matmuls``); returns how many."""
    n_matrices = 0
    for n in g.nodes:
        if n.op != "MatMul" or n.domain or len(n.inputs) != 2:
            continue
        found = _int8_dequantized(g, n.inputs[1], lambda qd, sd, axis: sd == [qd[1]] and axis in (1, -1))
        if found is None:
            continue
        dq, q, scale = found
        k, cols = q.dims
        if k % block_size or q.dtype != _INT8:  # uint8 with zero point 0 does not fit the implied zero point 128
            continue
        blocks = k // block_size
        w = np.frombuffer(g.raw(q), dtype=np.int8).reshape(k, cols)
        w = (w.T.astype(np.int16) + 128).astype(np.uint8)  # [N, K], zero point 128
        s = np.repeat(np.frombuffer(g.raw(scale), dtype="<f4"), blocks)  # [N * blocks], the column's scale
        base = dq.outputs[0]
        new_inits += [_encode_tensor(f"{base}/nbits_q", [cols, blocks, block_size], _UINT8, w.tobytes()),
                      _encode_tensor(f"{base}/nbits_scales", [cols * blocks], _FLOAT, s.astype("<f4").tobytes())]
        replaced[dq.span] = b""
        for name in dq.inputs:  # the int8 weight, its scales and zero points: unused now, not copied
            if name in g.inits and g.uses.get(name) == 1:
                replaced[g.inits[name].span] = b""
        replaced[n.span] = _encode_node(
            "MatMulNBits", [n.inputs[0], f"{base}/nbits_q", f"{base}/nbits_scales"], n.outputs, f"{base}/MatMulNBits",
            {"K": k, "N": cols, "bits": 8, "block_size": block_size, "accuracy_level": 1}, domain="com.microsoft")
        n_matrices += 1
    return n_matrices


def int8_weights(model: bytes, tables: bool = True, matrices: bool = True) -> tuple[bytes, int, int]:
    """Both rewrites (``int8_lookups`` and ``int8_matmuls``, each when asked) in one pass over the model:
    (new model bytes, tables rewritten, matrices rewritten); ``model`` itself when nothing was rewritten."""
    g = _parse(model)
    if g is None:
        return model, 0, 0
    replaced: dict[tuple[int, int], bytes] = {}
    new_inits: list[bytes] = []
    n_tables = _lookup_rewrites(g, replaced, new_inits) if tables else 0
    n_matrices = _matmul_rewrites(g, replaced, new_inits) if matrices else 0
    if not replaced:
        return model, 0, 0
    return _splice(model, g, replaced, new_inits, ("com.microsoft", 1) if n_matrices else None), n_tables, n_matrices


def int8_lookups(model: bytes) -> tuple[bytes, int]:
    """Rewrite every ``Gather(DequantizeLinear(int8 table, per-row or single scale, zero point 0))`` whose
    dequantised table feeds nothing else into a lookup of int8 rows dequantised afterwards. Returns the new
    model bytes and the number of tables rewritten (0: ``model`` itself)."""
    new, n_tables, _ = int8_weights(model, matrices=False)
    return new, n_tables


def int8_matmuls(model: bytes) -> tuple[bytes, int]:
    """Rewrite every ``MatMul(x, DequantizeLinear(int8 weight [K, N], one scale per column, zero point 0))``
    whose dequantised weight feeds nothing else, and whose K is a multiple of 128 (the block), into an 8-bit
    ``MatMulNBits`` with fp32 arithmetic (see the module docstring). Returns the new model bytes and the
    number of matrices rewritten (0: ``model`` itself)."""
    new, _, n_matrices = int8_weights(model, tables=False)
    return new, n_matrices
