"""Fast low-bit forms of ONNX LSTM/GRU/RNN layers for ONNX Runtime (used by the lower-recurrent pass).

- `layer`: read an LSTM/GRU/RNN node and the (DequantizeLinear) weights feeding it.
- `scan`: hoisted MatMulNBits input projection + Scan whose body runs the cell (INT2/3/4/8).
- `dynamic`: com.microsoft DynamicQuantizeLSTM (INT8 per-channel weights).
"""

from q4c.nomatch import NoMatch
from q4c.recurrent_lowering.dynamic import dequantized_lstm_copy, lower_to_dynamic_lstm
from q4c.recurrent_lowering.emit import Emitter, kernel_block
from q4c.recurrent_lowering.layer import RecurrentLayer, match_layer
from q4c.recurrent_lowering.scan import lower_to_scan

__all__ = ["Emitter", "NoMatch", "RecurrentLayer", "dequantized_lstm_copy", "kernel_block", "lower_to_dynamic_lstm",
           "lower_to_scan", "match_layer"]
