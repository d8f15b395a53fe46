"""4-bit quality on a really trained model: perplexity may not drift above 16-bit by more than measured.

The bundled demo (tinymix, trained on Python source) on an excerpt of the held-out evaluation text
(tests/data/eval-excerpt.py.txt, 2,223 tokens, 2,040 scored in windows of 256). Measured with the
default 4-bit scheme (experts q4, attention's output q6, every other matrix q5, two-level scales):
16-bit 37.245, 4-bit 37.781, ratio 1.0144 with the exact-arithmetic quantizer (1.0155 with the fast-math
one before it; with every other matrix at q8: 1.0061). llama.cpp's Q4_0 loses 2.7 % on the full text; we
allow 2.3 %.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from moe.convert import convert
from moe.convert.demo import DEMO_SOURCE
from moe.runtime.model import load_model
from moe.runtime.perplexity import perplexity

TEXT = Path(__file__).parent / "data" / "eval-excerpt.py.txt"
MARGIN = 1.023


def test_4bit_perplexity_stays_within_the_measured_margin_of_16bit(tmp_path):
    ppl = {}
    for bits in (16, 4):
        model = load_model(convert(str(DEMO_SOURCE), tmp_path / f"b{bits}", bits=bits))
        ids = np.array(model.tokenizer.encode(TEXT.read_text()), np.int64)
        ppl[bits], scored = perplexity(model, ids, 256)
        assert scored == 2040
    assert 30 < ppl[16] < 45, "16-bit perplexity of the trained demo model on Python source"
    assert ppl[4] / ppl[16] < MARGIN, ppl
