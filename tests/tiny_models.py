"""The tiny Llama config dict most tests build models from (one place instead of a copy per test file):
hidden 32, one decoder layer, 2 heads (2 key/value heads), the byte-level default tokenizer."""

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2}


def materialized(module):
    """``module`` after ``module.configure_model()``: its declared (meta-device) networks built with weights, as a
    Trainer does at fit/validate/test (lit_modules.base.DeferredNetworksModule)."""
    module.configure_model()
    return module
