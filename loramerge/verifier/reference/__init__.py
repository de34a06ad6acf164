"""verify's own reading of the adapter files: a second, separately written interpretation.

apply reads adapters through loramerge.readers, places them with loramerge.plan and lays the
factors out with loramerge.engine.deltas. If verify took its expected values from the same code,
a mistake there (a reader that ignores the rsLoRA scale, a pattern matched the wrong way, a
missing transpose) would make apply and verify agree on a wrong merge. This package reads the raw
files and config again, on its own, from what the formats' owners define (PEFT's LoraConfig and
layers, kohya-ss' LoRAModule, microsoft/LoRA's loralib), and says per output tensor what the
adapter adds to it. It imports nothing from loramerge's readers, plan or engine (a test checks
that), and it is kept small so that it can be read against those definitions.

What it covers: PEFT LoRA (lora_alpha / r, use_rslora, rank_pattern and alpha_pattern as PEFT
matches them, fan_in_fan_out, DoRA's magnitude, embeddings, convolutions, lora_B biases, saved full
tensors: modules_to_save, trained biases, saved embedding base layers; adapter-named keys), kohya
LoRA files (lora_down / lora_up / alpha, convolutions) and loralib checkpoints (Linear,
MergedLinear, Embedding). What it does not: PEFT's other tuners (AdaLoRA, IA3, LoHa, LoKr, VeRA),
LyCORIS modules in kohya files, trained token rows. Those are checked against apply's reading only,
and the report says so per tensor.

Every delta is given as linear-orientation factors: for a stored weight W with 2-D view
W2 = W.reshape(W.shape[0], -1), the change is scale * left @ right applied to W2 (layout 'linear',
'conv'), or to W2.T where W is stored [in, out] (layout 'transposed': Conv1D, embeddings).
"""

from .read import read_adapters
from .terms import JobRef, Reading, RefTerm

__all__ = ["RefTerm", "Reading", "JobRef", "read_adapters"]
