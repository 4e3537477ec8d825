"""The tokenizer.ggml.* keys of a GGUF file, read from the source's tokenizer files as llama.cpp's
converter reads them (conversion/base.py get_vocab_base, _set_vocab_gpt2; gguf's SpecialVocab).

    keys = gguf_vocab.vocabulary(source_dir, config)   # checked at build time, before anything is written

Byte-level BPE vocabularies only (GPT-2 style: SmolLM, Llama 3, Qwen, Mistral Nemo), tokenizer.ggml.model
"gpt2"; SentencePiece vocabularies (tokenizer.ggml.model "llama") are refused. The pre-tokenizer name
comes, as in the converter, from the sha256 of the token ids of a fixed text (CHKTXT) looked up in
llama.cpp's table (PRE_TOKENIZERS: the entries for the families the writer covers).
"""

import json
from hashlib import sha256
from pathlib import Path

from builder.errors import BuilderError, Problem

# llama.cpp's conversion/base.py get_vocab_base_pre: the text whose tokenization names the pre-tokenizer.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f '
          '(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 '
          '3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785'
          '\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= '
          '\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 '
          '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure '
          'I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
# sha256 of str(ids of CHKTXT) -> llama.cpp's pre-tokenizer name (from its table; the ref model in the comment).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",      # Qwen/Qwen3-Embedding-0.6B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",     # mistralai/Mistral-Nemo-Base-2407
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # openai-community/gpt2
}
# A vocabulary not in the table whose pre-tokenizer is exactly GPT-2's byte-level regex split is
# what llama.cpp calls gpt-2 (its own split is that regex).
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# gguf.TokenType values
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4
SPECIAL_IDS = ("bos", "eos", "unk", "pad")


def looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens some models forget to mark special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>")) or (token.startswith("<unused") and token.endswith(">"))


def read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BuilderError(Problem(where, path.name, f"missing or unreadable ({error})")) from None


def vocabulary(source: Path, config: dict, where: str = "") -> dict:
    """{gguf key suffix: value} of every tokenizer.ggml.* key (and the chat template), in write order.

    Raises BuilderError (before anything is written) for a vocabulary the writer cannot express.
    """
    where = where or source.name
    tokenizer = read_json(source / "tokenizer.json", where)
    settings = read_json(source / "tokenizer_config.json", where)
    model = tokenizer.get("model") or {}
    pre = tokenizer.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise BuilderError(Problem(where, "tokenizer.json", f"a {model.get('type')} vocabulary without a "
                                   "byte-level pre-tokenizer: the GGUF writer writes byte-level BPE (GPT-2 style) "
                                   "vocabularies only, not SentencePiece ones"))
    tokens, types = token_list(tokenizer, config["vocab_size"], where)
    merges = merge_list(model.get("merges") or [])
    if not merges:
        raise BuilderError(Problem(where, "tokenizer.json", "model.merges is empty: llama.cpp's BPE vocabulary needs merges"))
    keys = {"model": "gpt2", "pre": pre_tokenizer(source, pre, where), "tokens": tokens, "token_type": types,
            "merges": merges}
    ids = special_ids(source, config, tokenizer, settings)
    keys.update({f"{name}_token_id": ids[name] for name in SPECIAL_IDS if ids.get(name) is not None})
    bos_first, eos_last = template_adds(tokenizer, ids)
    keys["add_bos_token"] = bool(settings.get("add_bos_token", bos_first))
    keys["add_eos_token"] = bool(settings.get("add_eos_token", eos_last))
    keys["add_space_prefix"] = bool(settings.get("add_prefix_space", pre.get("add_prefix_space", False)))
    template = settings.get("chat_template")
    if template is None and (source / "chat_template.jinja").is_file():
        template = (source / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        keys["chat_template"] = template
    return keys


def token_list(tokenizer: dict, vocab_size: int, where: str) -> tuple:
    """(tokens, token types) for ids 0 .. vocab_size - 1, as get_vocab_base lists them."""
    by_id = {index: token for token, index in tokenizer["model"].get("vocab", {}).items()}
    added = {entry["id"]: entry for entry in tokenizer.get("added_tokens", [])}
    by_id.update({index: entry["content"] for index, entry in added.items()})
    beyond = sorted(index for index in by_id if index >= vocab_size)
    if beyond:
        raise BuilderError(Problem(where, "tokenizer.json", f"token id {beyond[-1]} is beyond config.json's "
                                   f"vocab_size {vocab_size}"))
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            special = added[index].get("special") or looks_special(token)
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    return tokens, types


def merge_list(merges: list) -> list:
    """Merges as "a b" strings; pairs (tokenizers >= 0.20) with spaces inside encoded as the converter does."""
    if merges and isinstance(merges[0], list):
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    return list(merges)


def pre_tokenizer(source: Path, pre: dict, where: str) -> str:
    """llama.cpp's name for the vocabulary's pre-tokenizer (get_vocab_base_pre's hash, then GPT-2's split)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(source / "tokenizer.json")).encode(CHKTXT).ids
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    if {key: pre.get(key) for key in GPT2_PRE_TOKENIZER} == GPT2_PRE_TOKENIZER:
        return "gpt-2"
    known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
    raise BuilderError(Problem(where, "tokenizer.json", f"pre-tokenizer not recognised (llama.cpp chkhsh {digest}); "
                               f"the GGUF writer knows {known} (builder/formats/gguf_vocab.py PRE_TOKENIZERS)"))


def special_ids(source: Path, config: dict, tokenizer: dict, settings: dict) -> dict:
    """bos/eos/unk/pad ids: generation_config.json, then config.json (what generation uses), then
    tokenizer_config.json's tokens. (Checkpoints converted from GGUF by transformers carry a
    tokenizer_config whose eos is the bos token; config.json has it right.)"""
    generation = {}
    if (source / "generation_config.json").is_file():
        generation = read_json(source / "generation_config.json", source.name)
    by_content = {entry["content"]: entry["id"] for entry in tokenizer.get("added_tokens", [])}
    vocab = tokenizer["model"].get("vocab", {})
    found = {}
    for name in SPECIAL_IDS:
        value = generation.get(f"{name}_token_id", config.get(f"{name}_token_id"))
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            token = settings.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            value = by_content.get(token, vocab.get(token)) if isinstance(token, str) else None
        found[name] = value
    return found


def template_adds(tokenizer: dict, ids: dict) -> tuple:
    """(bos first, eos last): whether the tokenizer's TemplateProcessing adds them around a sequence."""
    processor = tokenizer.get("post_processor") or {}
    for step in processor.get("processors", [processor]):
        if step.get("type") == "TemplateProcessing":
            single = step.get("single", [])
            specials = step.get("special_tokens", {})

            def special(item):
                name = item.get("SpecialToken", {}).get("id")
                return (specials.get(name, {}).get("ids") or [None])[0] if name else None

            first = special(single[0]) if single else None
            last = special(single[-1]) if single else None
            return (first is not None and first == ids.get("bos"), last is not None and last == ids.get("eos"))
    return False, False
