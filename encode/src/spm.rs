//! T5's fast tokenizer built from a SentencePiece `spiece.model`.
//!
//! google/t5-v1_1-xxl and PixArt-α's `tokenizer/` ship only the SentencePiece model.
//! transformers' `T5Tokenizer` turns it into a fast tokenizer: the unigram pieces and
//! scores, `<extra_id_N>` sentinels appended in reverse order (`extra_ids` of
//! `tokenizer_config.json`, 100 by default), the model's precompiled normalization
//! map, whitespace split + metaspace (`▁` prepended), and `</s>` appended.
//! [`t5_tokenizer_json`] builds the same `tokenizer.json` document from the model
//! file; the tests compare it with the one transformers writes.
//!
//! The file is a protobuf `ModelProto`
//! (<https://github.com/google/sentencepiece/blob/master/src/sentencepiece_model.proto>):
//! field 1 `pieces` {1 `piece`, 2 `score` (float), 3 `type`}, field 2 `trainer_spec`
//! {3 `model_type`: 1 unigram, 2 BPE, ...}, field 3 `normalizer_spec`
//! {2 `precompiled_charsmap`}.

use serde_json::{Value, json};

/// Why a SentencePiece model could not be converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpmError(pub String);

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, SpmError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| SpmError("truncated varint".into()))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(SpmError("varint longer than 10 bytes".into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SpmError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| SpmError("field runs past the end of the file".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next field: (number, value). Varints come back as `Int`, fixed-width and
    /// length-delimited values as `Bytes`.
    fn field(&mut self) -> Result<(u64, Field<'a>), SpmError> {
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Field::Int(self.varint()?),
            1 => Field::Bytes(self.take(8)?),
            2 => {
                let n = usize::try_from(self.varint()?)
                    .map_err(|_| SpmError("length does not fit in memory".into()))?;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Bytes(self.take(4)?),
            w => return Err(SpmError(format!("unsupported protobuf wire type {w}"))),
        };
        Ok((num, value))
    }
}

enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

/// One vocabulary entry of the model.
#[derive(Debug, Clone, PartialEq)]
struct Piece {
    piece: String,
    score: f32,
    kind: u64,
}

const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;

fn parse_piece(buf: &[u8]) -> Result<Piece, SpmError> {
    let mut r = Reader::new(buf);
    let mut p = Piece {
        piece: String::new(),
        score: 0.0,
        kind: 1,
    };
    while !r.done() {
        match r.field()? {
            (1, Field::Bytes(b)) => {
                p.piece = String::from_utf8(b.to_vec())
                    .map_err(|_| SpmError("a piece is not UTF-8".into()))?;
            }
            (2, Field::Bytes(b)) if b.len() == 4 => {
                p.score = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            (3, Field::Int(t)) => p.kind = t,
            _ => {}
        }
    }
    Ok(p)
}

/// Standard base64 with padding (how tokenizers serialises the charsmap).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(T[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn added(id: usize, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": true})
}

/// The `tokenizer.json` document transformers' `T5Tokenizer` makes from the bytes of
/// a `spiece.model`, with `extra_ids` sentinel tokens.
pub fn t5_tokenizer_json(model: &[u8], extra_ids: usize) -> Result<Value, SpmError> {
    let mut r = Reader::new(model);
    let mut pieces = Vec::new();
    let mut charsmap: &[u8] = &[];
    let mut model_type = 1;
    while !r.done() {
        match r.field()? {
            (1, Field::Bytes(b)) => pieces.push(parse_piece(b)?),
            (2, Field::Bytes(b)) => {
                let mut t = Reader::new(b);
                while !t.done() {
                    if let (3, Field::Int(m)) = t.field()? {
                        model_type = m;
                    }
                }
            }
            (3, Field::Bytes(b)) => {
                let mut n = Reader::new(b);
                while !n.done() {
                    if let (2, Field::Bytes(c)) = n.field()? {
                        charsmap = c;
                    }
                }
            }
            _ => {}
        }
    }
    if model_type != 1 {
        return Err(SpmError(format!(
            "model_type {model_type} is not a unigram model (T5's tokenizer is unigram)"
        )));
    }
    if pieces.is_empty() {
        return Err(SpmError("no pieces: not a SentencePiece model".into()));
    }
    let unk = pieces
        .iter()
        .position(|p| p.kind == UNKNOWN)
        .ok_or_else(|| SpmError("no unknown piece".into()))?;
    let eos = pieces
        .iter()
        .position(|p| p.piece == "</s>")
        .ok_or_else(|| SpmError("no `</s>` piece".into()))?;
    let mut added_tokens: Vec<Value> = pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| p.kind == CONTROL || p.kind == UNKNOWN)
        .map(|(i, p)| added(i, &p.piece))
        .collect();
    let mut vocab: Vec<Value> = pieces
        .iter()
        .map(|p| json!([p.piece, f64::from(p.score)]))
        .collect();
    for k in (0..extra_ids).rev() {
        let tok = format!("<extra_id_{k}>");
        added_tokens.push(added(vocab.len(), &tok));
        vocab.push(json!([tok, 0.0]));
    }
    let normalizer = if charsmap.is_empty() {
        Value::Null
    } else {
        json!({"type": "Precompiled", "precompiled_charsmap": base64(charsmap)})
    };
    let metaspace = json!({"type": "Metaspace", "replacement": "▁",
                           "prepend_scheme": "always", "split": true});
    let eos_seq = |id: &str| json!({"SpecialToken": {"id": id, "type_id": 0}});
    let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Sequence",
                          "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [seq("A"), eos_seq("</s>")],
            "pair": [seq("A"), eos_seq("</s>"), seq("B"), eos_seq("</s>")],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]}},
        },
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": unk, "vocab": vocab, "byte_fallback": false},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_like_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    /// A protobuf field: key varint + payload.
    fn field(num: u8, wire: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(num << 3) | wire];
        if wire == 2 {
            v.push(payload.len() as u8);
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn refuses_bpe_models_and_garbage() {
        let piece = [field(1, 2, b"<unk>"), field(3, 0, &[2])].concat();
        let bpe = [field(1, 2, &piece), field(2, 2, &field(3, 0, &[2]))].concat();
        let e = t5_tokenizer_json(&bpe, 0).unwrap_err();
        assert!(e.0.contains("not a unigram"), "{e:?}");
        let e = t5_tokenizer_json(&[0x0a, 0x30, 1], 0).unwrap_err();
        assert!(e.0.contains("past the end"), "{e:?}");
        let e = t5_tokenizer_json(&field(1, 2, &piece), 0).unwrap_err();
        assert!(e.0.contains("</s>"), "{e:?}");
    }
}
