"""Recurrent layers: RNN, LSTM, GRU and their single-step cells.

The time loop is unrolled into ops, so a define-and-run graph needs the sequence
length at build time (the batch size may stay `None`). The input projection of all
time steps is one matmul before the loop; each step adds only the hidden projection.
Gate equations, parameter names, shapes and initialisation follow torch.nn.
"""

from __future__ import annotations

import math

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.layers import empty_parameter
from luoshu.nn.module import Module

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


# --- one time step ------------------------------------------------------------------------
# `xg` is the input projection x W_ihᵀ + b_ih (plus b_hh for RNN and LSTM, whose hidden bias
# is not gated); `h` and `c` are None at the first step of a zero initial state, which
# skips the hidden matmul instead of multiplying zeros.
def _rnn_step(mode, xg, h, c, w_hh, b_hh, w_hr):
    pre = xg if h is None else xg + F.linear(h, w_hh)
    return (F.tanh(pre) if mode == "RNN_TANH" else F.relu(pre)), None


def _lstm_step(mode, xg, h, c, w_hh, b_hh, w_hr):
    gates = xg if h is None else xg + F.linear(h, w_hh)
    i, f, g, o = ops.split(gates, 4, axis=-1)
    i, g, o = F.sigmoid(i), F.tanh(g), F.sigmoid(o)
    c = i * g if c is None else F.sigmoid(f) * c + i * g
    h = o * F.tanh(c)
    return (h if w_hr is None else F.linear(h, w_hr)), c


def _gru_step(mode, xg, h, c, w_hh, b_hh, w_hr):
    xr, xz, xn = ops.split(xg, 3, axis=-1)
    if h is None and b_hh is None:
        return (1.0 - F.sigmoid(xz)) * F.tanh(xn), None
    hr, hz, hn = ops.split(b_hh if h is None else F.linear(h, w_hh, b_hh), 3, axis=-1)
    r, z = F.sigmoid(xr + hr), F.sigmoid(xz + hz)
    n = F.tanh(xn + r * hn)
    return ((1.0 - z) * n if h is None else (1.0 - z) * n + z * h), None


_STEPS = {"RNN_TANH": _rnn_step, "RNN_RELU": _rnn_step, "LSTM": _lstm_step, "GRU": _gru_step}


def _input_projection(mode, x, w_ih, b_ih, b_hh):
    xg = F.linear(x, w_ih, b_ih)
    return xg + b_hh if b_hh is not None and mode != "GRU" else xg


def _unstack(x, n: int, axis: int = 0) -> list:
    """The n slices of x along `axis`, without that axis (one split op)."""
    return [ops.squeeze(piece, axis) for piece in ops.split(x, n, axis=axis)]


def _init_uniform(module: Module, hidden_size: int) -> None:
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    for p in module.parameters():
        init.uniform_(p, -bound, bound)


# --- multi-layer sequence modules ---------------------------------------------------------
class RNNBase(Module):
    """The shared machinery of RNN, LSTM and GRU (`mode` picks the cell)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 dtype="float32", device=None):
        super().__init__()
        name = type(self).__name__
        if mode not in _GATES:
            raise Error(f"{name}: unknown mode {mode!r}; expected one of {sorted(_GATES)}")
        if input_size <= 0 or hidden_size <= 0 or num_layers <= 0:
            raise Error(f"{name} needs positive sizes, found input_size={input_size}, "
                        f"hidden_size={hidden_size}, num_layers={num_layers}")
        if not 0.0 <= dropout <= 1.0:
            raise Error(f"{name}: dropout must be in [0, 1], found {dropout}")
        if proj_size < 0 or proj_size >= hidden_size or (proj_size and mode != "LSTM"):
            raise Error(f"{name}: proj_size must be 0, or in (0, hidden_size) for an LSTM; found {proj_size}")
        self.mode, self.input_size, self.hidden_size, self.num_layers = mode, input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        directions = 2 if bidirectional else 1
        out_size = proj_size or hidden_size
        gate_size = _GATES[mode] * hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else out_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                setattr(self, "weight_ih" + suffix, empty_parameter((gate_size, layer_input), dtype, device))
                setattr(self, "weight_hh" + suffix, empty_parameter((gate_size, out_size), dtype, device))
                if bias:
                    setattr(self, "bias_ih" + suffix, empty_parameter((gate_size,), dtype, device))
                    setattr(self, "bias_hh" + suffix, empty_parameter((gate_size,), dtype, device))
                if proj_size:
                    setattr(self, "weight_hr" + suffix, empty_parameter((proj_size, hidden_size), dtype, device))
        _init_uniform(self, hidden_size)

    def _weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        get = self._parameters.get
        return (get("weight_ih" + suffix), get("weight_hh" + suffix), get("bias_ih" + suffix),
                get("bias_hh" + suffix), get("weight_hr" + suffix))

    def _initial_states(self, hx, batch, count: int, size: int):
        """Per (layer, direction) initial states from an (L·D, N, H) tensor, or Nones."""
        if hx is None:
            return [None] * count
        hx = hx if batch != "unbatched" else ops.unsqueeze(hx, 1)
        n = 1 if batch == "unbatched" else batch
        if hx.ndim != 3 or hx.shape[0] not in (count, None) or hx.shape[-1] not in (size, None) or (
                n is not None and hx.shape[1] not in (n, None)):
            raise Error(f"{type(self).__name__}: initial states need shape ({count}, {n}, {size})"
                        f"{' without the batch dim for an unbatched input' if batch == 'unbatched' else ''}, "
                        f"found {hx.shape if batch != 'unbatched' else hx.shape[:1] + hx.shape[2:]}")
        return _unstack(hx, count)

    def _run_direction(self, x, steps: int, weights, h, c, reverse: bool):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights
        step = _STEPS[self.mode]
        xg = _unstack(_input_projection(self.mode, x, w_ih, b_ih, b_hh), steps)
        outputs = [None] * steps
        for t in (reversed(range(steps)) if reverse else range(steps)):
            h, c = step(self.mode, xg[t], h, c, w_hh, b_hh, w_hr)
            outputs[t] = h
        return ops.stack(outputs, axis=0), h, c

    def forward(self, input, hx=None):
        name = type(self).__name__
        if input.ndim not in (2, 3):
            raise Error(f"{name} expects a 2-d (unbatched) or 3-d input, found shape {input.shape}")
        if input.shape[-1] not in (self.input_size, None):
            raise Error(f"{name}: input feature size must be {self.input_size}, found shape {input.shape}")
        batched = input.ndim == 3
        if not batched:
            x = ops.unsqueeze(input, 1)
        else:
            x = ops.transpose(input, 0, 1) if self.batch_first else input
        steps = x.shape[0]
        if steps is None:
            raise Error(f"{name}: the sequence length must be known when the graph is built (the time loop "
                        f"is unrolled); found input shape {input.shape}")
        if steps == 0:
            raise Error(f"{name}: the input sequence is empty")
        directions = 2 if self.bidirectional else 1
        count = self.num_layers * directions
        batch = x.shape[1] if batched else "unbatched"
        out_size = self.proj_size or self.hidden_size
        if self.mode == "LSTM":
            h0, c0 = (None, None) if hx is None else hx
            h_init = self._initial_states(h0, batch, count, out_size)
            c_init = self._initial_states(c0, batch, count, self.hidden_size)
        else:
            h_init = self._initial_states(hx, batch, count, out_size)
            c_init = [None] * count
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                out, h, c = self._run_direction(x, steps, self._weights(layer, direction), h_init[k], c_init[k],
                                                reverse=direction == 1)
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if directions == 1 else ops.concat(outputs, axis=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        h_n = ops.stack(h_n, axis=0)
        if not batched:
            x, h_n = ops.squeeze(x, 1), ops.squeeze(h_n, 1)
        elif self.batch_first:
            x = ops.transpose(x, 0, 1)
        if self.mode != "LSTM":
            return x, h_n
        c_n = ops.stack(c_n, axis=0)
        return x, (h_n, c_n if batched else ops.squeeze(c_n, 1))

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s


class RNN(RNNBase):
    """Elman RNN: h_t = tanh(x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh) (or relu)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 dtype="float32", device=None):
        if nonlinearity not in ("tanh", "relu"):
            raise Error(f"RNN: nonlinearity must be 'tanh' or 'relu', found {nonlinearity!r}")
        super().__init__("RNN_" + nonlinearity.upper(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, dtype=dtype, device=device)
        self.nonlinearity = nonlinearity


class LSTM(RNNBase):
    """Long short-term memory; `forward(x, (h0, c0))` returns (output, (h_n, c_n))."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 dtype="float32", device=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, dtype=dtype, device=device)


class GRU(RNNBase):
    """Gated recurrent unit; `forward(x, h0)` returns (output, h_n)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 dtype="float32", device=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         dtype=dtype, device=device)


# --- single-step cells --------------------------------------------------------------------
class _CellBase(Module):
    def __init__(self, mode: str, input_size: int, hidden_size: int, bias: bool, dtype, device):
        super().__init__()
        self._mode = mode
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        gate_size = _GATES[self._mode] * hidden_size
        self.weight_ih = empty_parameter((gate_size, input_size), dtype, device)
        self.weight_hh = empty_parameter((gate_size, hidden_size), dtype, device)
        if bias:
            self.bias_ih = empty_parameter((gate_size,), dtype, device)
            self.bias_hh = empty_parameter((gate_size,), dtype, device)
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        _init_uniform(self, hidden_size)

    def _step(self, input, h, c):
        xg = _input_projection(self._mode, input, self.weight_ih, self.bias_ih, self.bias_hh)
        return _STEPS[self._mode](self._mode, xg, h, c, self.weight_hh, self.bias_hh, None)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")


class RNNCell(_CellBase):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 dtype="float32", device=None):
        if nonlinearity not in ("tanh", "relu"):
            raise Error(f"RNNCell: nonlinearity must be 'tanh' or 'relu', found {nonlinearity!r}")
        super().__init__("RNN_" + nonlinearity.upper(), input_size, hidden_size, bias, dtype, device)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        return self._step(input, hx, None)[0]


class LSTMCell(_CellBase):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, dtype="float32", device=None):
        super().__init__("LSTM", input_size, hidden_size, bias, dtype, device)

    def forward(self, input, hx=None):
        h, c = (None, None) if hx is None else hx
        h, c = self._step(input, h, c)
        return h, c


class GRUCell(_CellBase):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, dtype="float32", device=None):
        super().__init__("GRU", input_size, hidden_size, bias, dtype, device)

    def forward(self, input, hx=None):
        return self._step(input, hx, None)[0]
