"""Torch reference of ComfyUI's SD3 text encoding, written from its source at commit
a125cd84b054a57729b5eecab930ca9408719832 (comfy/sd1_clip.py `token_weights`, `SDTokenizer.tokenize_with_weights`,
`ClipTokenWeightEncoder.encode_token_weights`, `SDClipModel.forward`; comfy/sdxl_clip.py `SDXLClipG*`;
comfy/text_encoders/sd3_clip.py `T5XXLTokenizer`, `SD3ClipModel.encode_token_weights`; comfy/conds.py
`CONDCrossAttn.concat`), in the shape ComfyUI's loops have, over transformers' CLIP and T5 models (the
tiny fixture's). The special token ids come from the tokenizers (ComfyUI hard-codes the real vocabulary's).
"""

from __future__ import annotations

import math

import torch


def parse_parentheses(string):
    result, current_item, nesting_level = [], "", 0
    for char in string:
        if char == "(":
            if nesting_level == 0:
                if current_item:
                    result.append(current_item)
                current_item = "("
            else:
                current_item += char
            nesting_level += 1
        elif char == ")":
            nesting_level -= 1
            if nesting_level == 0:
                result.append(current_item + ")")
                current_item = ""
            else:
                current_item += char
        else:
            current_item += char
    if current_item:
        result.append(current_item)
    return result


def token_weights(string, current_weight):
    out = []
    for x in parse_parentheses(string):
        weight = current_weight
        if len(x) >= 2 and x[-1] == ")" and x[0] == "(":
            x = x[1:-1]
            xx = x.rfind(":")
            weight *= 1.1
            if xx > 0:
                try:
                    weight = float(x[xx + 1 :])
                    x = x[:xx]
                except ValueError:
                    pass
            out += token_weights(x, weight)
        else:
            out += [(x, current_weight)]
    return out


def tokenize_with_weights(tok, text, *, start, end, pad, max_length, pad_to_max_length, min_length, weights=True):
    """SDTokenizer.tokenize_with_weights (no embeddings): a list of batches of (token, weight)."""
    text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    parsed = token_weights(text, 1.0) if weights else [(text, 1.0)]
    tokens = []
    for segment, weight in parsed:
        word = segment.replace("\0\1", ")").replace("\0\2", "(")
        if word == "":
            continue
        ids = tok(word)["input_ids"]
        ids = ids[1:-1] if start is not None else ids[:-1]
        tokens.append([(t, weight) for t in ids])
    batched, batch = [], []
    if start is not None:
        batch.append((start, 1.0))
    batched.append(batch)
    for t_group in tokens:
        is_large = len(t_group) >= 8
        while len(t_group) > 0:
            if len(t_group) + len(batch) > max_length - 1:
                remaining = max_length - len(batch) - 1
                if is_large:
                    batch.extend(t_group[:remaining])
                    batch.append((end, 1.0))
                    t_group = t_group[remaining:]
                else:
                    batch.append((end, 1.0))
                    if pad_to_max_length:
                        batch.extend([(pad, 1.0)] * remaining)
                batch = [(start, 1.0)] if start is not None else []
                batched.append(batch)
            else:
                batch.extend(t_group)
                t_group = []
    batch.append((end, 1.0))
    if pad_to_max_length and len(batch) < max_length:
        batch.extend([(pad, 1.0)] * (max_length - len(batch)))
    if min_length is not None and len(batch) < min_length:
        batch.extend([(pad, 1.0)] * (min_length - len(batch)))
    return batched


def encode_token_weights(encode, pairs, empty):
    """ClipTokenWeightEncoder.encode_token_weights: (states concatenated over sections, first pooled)."""
    to_encode = [[t for t, _ in x] for x in pairs]
    has_weights = any(w != 1.0 for x in pairs for _, w in x)
    if has_weights:
        to_encode.append(empty(max(len(x) for x in to_encode)))
    out, pooled = encode(torch.tensor(to_encode))
    output = []
    for k in range(len(pairs)):
        z = out[k : k + 1].clone()
        if has_weights:
            z_empty = out[-1]
            for j in range(z.shape[1]):
                weight = pairs[k][j][1]
                if weight != 1.0:
                    z[0][j] = (z[0][j] - z_empty[j]) * weight + z_empty[j]
        output.append(z)
    return torch.cat(output, dim=-2), None if pooled is None else pooled[0:1]


class ComfySD3:
    """SD3Tokenizer + SD3ClipModel over transformers models; `encode(text)` is one CLIPTextEncode."""

    def __init__(self, clip_l, tok_l, clip_g, tok_g, t5, tok_t5, width, layer=-2):
        self.clip_l, self.tok_l, self.clip_g, self.tok_g = clip_l, tok_l, clip_g, tok_g
        self.t5, self.tok_t5, self.width, self.layer = t5, tok_t5, width, layer

    def _clip(self, model, tok, pad, projected, text, weights):
        start, end = tok("")["input_ids"][:2]
        pairs = tokenize_with_weights(
            tok, text, start=start, end=end, pad=pad, max_length=77, pad_to_max_length=True, min_length=None,
            weights=weights,
        )  # fmt: skip

        def encode(ids):
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            # SDClipModel: pooled at num_tokens - 1, num_tokens counting up to the first end token
            first_end = torch.tensor([row.tolist().index(end) for row in ids])
            pooled = out.last_hidden_state[torch.arange(len(ids)), first_end]
            return out.hidden_states[self.layer], model.text_projection(pooled) if projected else pooled

        def empty(n):  # gen_empty_tokens
            return [start, end] + [pad] * (n - 2)

        return encode_token_weights(encode, pairs, empty)

    def _t5(self, text, weights):
        end = self.tok_t5("")["input_ids"][0]
        pairs = tokenize_with_weights(
            self.tok_t5, text, start=None, end=end, pad=0, max_length=99999999, pad_to_max_length=False,
            min_length=77, weights=weights,
        )  # fmt: skip

        def encode(ids):
            with torch.no_grad():
                return self.t5(ids).last_hidden_state, None

        return encode_token_weights(encode, pairs, lambda n: [end] + [0] * (n - 1))[0]

    def encode(self, text, weights=True):
        """(cond (1, tokens, width), pooled (1, L + G pooled width))."""
        l_out, l_pooled = self._clip(self.clip_l, self.tok_l, self.tok_l("")["input_ids"][1], False, text, weights)
        g_out, g_pooled = self._clip(self.clip_g, self.tok_g, 0, True, text, weights)
        cut_to = min(l_out.shape[1], g_out.shape[1])
        lg_out = torch.cat([l_out[:, :cut_to], g_out[:, :cut_to]], dim=-1)
        lg_out = torch.nn.functional.pad(lg_out, (0, self.width - lg_out.shape[-1]))
        out = lg_out if self.t5 is None else torch.cat([lg_out, self._t5(text, weights)], dim=-2)
        return out, torch.cat((l_pooled, g_pooled), dim=-1)


def concat(conds):
    """CONDCrossAttn.concat (after can_concat allowed it): each repeated to the lcm of the lengths."""
    length = math.lcm(*(c.shape[1] for c in conds))
    return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])
