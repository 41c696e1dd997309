"""Ground floor of the language-model toolkit: Hugging Face loading (:mod:`lm.hf`), tokenizers and the prompt
format a model carries (:mod:`lm.tokenizers`), model aliases and GGUF conversion (:mod:`lm.model_aliases`), the
one sampler (:mod:`lm.sampling`), padding (:mod:`lm.tensors`), preference pairs packed behind their shared prompt
(:mod:`lm.packing`), chunked per-token log-probs (:mod:`lm.logprobs`), weight quantizers (:mod:`lm.quantization`), FSDP2
sharding (:mod:`lm.sharding`) and the optional-extra checks (:mod:`lm.extras`).

It imports nothing from ``datamodules``, ``lit_modules``, ``callbacks``, ``training``, ``discovery`` or ``cli``;
every other package may import it. Nothing is imported here, so ``import lm`` stays cheap.
"""
