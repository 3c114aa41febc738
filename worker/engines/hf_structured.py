"""Structured output for the transformers engine: lm-format-enforcer's JSON schema parser (or, for a
choice, its regex parser) turned into transformers' `prefix_allowed_tokens_fn`, so decoding can only
produce what the schema allows.

lm-format-enforcer's own transformers integration imports a path transformers 5 removed, so this
builds its tokenizer data the same way from the core API (once per engine: it decodes the vocabulary).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from lmformatenforcer import JsonSchemaParser, RegexParser
from lmformatenforcer.exceptions import LMFormatEnforcerException as UnsupportedSchema
from lmformatenforcer.tokenenforcer import TokenEnforcer, TokenEnforcerTokenizerData
from transformers import PreTrainedTokenizerBase

from schema.jobs import ResponseFormat

__all__ = ["UnsupportedSchema", "allowed_tokens_fn", "tokenizer_data"]


def tokenizer_data(tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]) -> TokenEnforcerTokenizerData:
    """Every regular token's text, and whether it starts a word (decoded after a "0" token)."""
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    regular = []
    for token in range(len(tokenizer)):
        if token in special:
            continue
        after_zero = tokenizer.decode([zero, token])[1:]
        regular.append((token, after_zero, len(after_zero) > len(tokenizer.decode([token]))))
    decode = functools.partial(_decode, tokenizer)
    return TokenEnforcerTokenizerData(regular, decode, eos_ids, False, len(tokenizer))


def _decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    return str(tokenizer.decode(tokens)).rstrip("\ufffd")  # a partial UTF-8 character is not text yet


def allowed_tokens_fn(data: TokenEnforcerTokenizerData, fmt: ResponseFormat) -> Callable[[int, Any], list[int]]:
    """prefix_allowed_tokens_fn for model.generate: one enforcer for the whole batch (it keys its state
    by each row's tokens so far, so rows of one batch do not mix)."""
    parser = (RegexParser("|".join(re.escape(c) for c in fmt.choice)) if fmt.choice is not None
              else JsonSchemaParser(fmt.json_schema))  # json_schema None: any JSON object
    enforcer = TokenEnforcer(data, parser)

    def allowed(batch_id: int, sent: Any) -> list[int]:
        return list(enforcer.get_allowed_tokens(sent.tolist()).allowed_tokens)

    return allowed
