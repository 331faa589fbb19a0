//! A webhook's body as the store keeps it (LZ4 where that makes it smaller), and a stored
//! webhook read back as it arrived.

use bytes::Bytes;

use super::EngineError;

/// No stored body decompresses to more than this (bodies are limited far below it).
const MAX_STORED_BODY: usize = 256 * 1024 * 1024;

/// A delivery's body as it is stored: LZ4-compressed (size prepended) when that makes it
/// smaller. A webhook's JSON shrinks four to five times, and so does what each
/// acknowledgement writes. Encoded on the thread that received the webhook, so the writer
/// that every acknowledgement waits for never spends time on it.
#[derive(Clone, Debug, Default)]
pub struct StoredBody {
    pub bytes: Bytes,
    /// `None` for the body as it came, `Some("lz4")`.
    pub encoding: Option<&'static str>,
}

impl StoredBody {
    /// Compresses `raw` when that makes it smaller. Each thread keeps its compression
    /// table and scratch buffer from one body to the next instead of allocating them for
    /// every webhook (and shrinking the output after): 2,500 fewer instructions for a 7.8 KB
    /// push, 3 % of storing it (`benches/instructions.sh`).
    pub fn encode(raw: Bytes) -> StoredBody {
        thread_local! {
            static SCRATCH: std::cell::RefCell<(lz4_flex::block::CompressTable, Vec<u8>)> =
                std::cell::RefCell::new(Default::default());
        }
        if raw.len() >= 256 {
            let compressed = SCRATCH.with_borrow_mut(|(table, buffer)| {
                buffer.resize(4 + lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                buffer[..4].copy_from_slice(&(raw.len() as u32).to_le_bytes());
                let size = lz4_flex::block::compress_into_with_table(&raw, &mut buffer[4..], table)
                    .expect("the buffer holds the largest output");
                let compressed =
                    (4 + size < raw.len()).then(|| Bytes::copy_from_slice(&buffer[..4 + size]));
                // A rare huge body does not keep its buffer's size for good.
                if buffer.capacity() > 1024 * 1024 {
                    *buffer = Vec::new();
                }
                compressed
            });
            if let Some(bytes) = compressed {
                return StoredBody {
                    bytes,
                    encoding: Some("lz4"),
                };
            }
        }
        StoredBody {
            bytes: raw,
            encoding: None,
        }
    }

    /// The body as it arrived, from what was stored.
    pub fn decode(stored: Vec<u8>, encoding: Option<&str>) -> Result<Vec<u8>, String> {
        match encoding {
            None => Ok(stored),
            Some("lz4") => {
                let size = stored
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or("a stored body is cut short")?;
                if size > MAX_STORED_BODY {
                    return Err(format!(
                        "a stored body claims {size} bytes; the store is damaged"
                    ));
                }
                lz4_flex::block::decompress_size_prepended(&stored)
                    .map_err(|err| format!("a stored body cannot be decompressed: {err}"))
            }
            Some(other) => Err(format!("a stored body has an unknown encoding {other:?}")),
        }
    }
}

/// A stored webhook, as it arrived but for its secret headers.
pub struct StoredWebhook {
    pub source: String,
    pub delivery_id: String,
    /// When it was received, as stored (milliseconds since 1970).
    pub received_at: i64,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The webhook URL's `?ref=` it arrived with, which overrode its triggers' refs (as its
    /// stored answer says: `url_ref`).
    pub url_ref: Option<String>,
    /// What the forge said, for each of its events (in order), when asked which files a
    /// push changed ([`crate::compare`]), as its stored answer keeps it.
    pub compared: Vec<Option<crate::event::ComparedRecord>>,
}

impl StoredWebhook {
    /// A stored row as an engine reads it: headers as stored (JSON), the body as stored
    /// (see [`StoredBody`]), `received_at` on the relay's clock, and its stored answer.
    pub(crate) fn from_stored(
        delivery_id: &str,
        source: String,
        headers: &str,
        (body, encoding): (Vec<u8>, Option<&str>),
        received_at: i64,
        summary: &str,
    ) -> Result<StoredWebhook, EngineError> {
        #[derive(serde::Deserialize)]
        struct Summary {
            url_ref: Option<String>,
            #[serde(default)]
            events: Vec<SummaryEvent>,
        }
        #[derive(serde::Deserialize)]
        struct SummaryEvent {
            compared: Option<crate::event::ComparedRecord>,
        }
        let summary = serde_json::from_str::<Summary>(summary).ok();
        Ok(StoredWebhook {
            delivery_id: delivery_id.to_owned(),
            source,
            received_at,
            headers: serde_json::from_str(headers)
                .map_err(|err| EngineError::failed(format!("stored headers: {err}")))?,
            body: Bytes::from(StoredBody::decode(body, encoding).map_err(EngineError::failed)?),
            compared: summary.as_ref().map_or_else(Vec::new, |summary| {
                summary.events.iter().map(|e| e.compared.clone()).collect()
            }),
            url_ref: summary.and_then(|summary| summary.url_ref),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forge's answers kept in a webhook's stored answer (`events[].compared`) come
    /// back with it, in its events' order; an answer without them (older records) has none.
    #[test]
    fn a_stored_answer_gives_back_what_the_forge_said() {
        use crate::event::ComparedRecord;
        let summary = r#"{"delivery": "d", "url_ref": "main", "events": [
            {"kind": "push", "compared": {"files": ["a.go", "b.md"]}},
            {"kind": "tag"},
            {"kind": "push", "compared": {"failed": "the forge answered 403: 403 Forbidden"}}]}"#;
        let stored =
            StoredWebhook::from_stored("d", "gl".into(), "[]", (b"{}".to_vec(), None), 0, summary)
                .unwrap();
        assert_eq!(stored.url_ref.as_deref(), Some("main"));
        assert_eq!(
            stored.compared,
            [
                Some(ComparedRecord::Files(vec!["a.go".into(), "b.md".into()])),
                None,
                Some(ComparedRecord::Failed(
                    "the forge answered 403: 403 Forbidden".into()
                )),
            ]
        );
        let older =
            StoredWebhook::from_stored("d", "gl".into(), "[]", (b"{}".to_vec(), None), 0, "{}")
                .unwrap();
        assert!(older.compared.is_empty());
    }

    #[test]
    fn bodies_are_stored_compressed_and_come_back_byte_for_byte() {
        let body = include_bytes!("../../tests/fixtures/github/push_tag.json");
        let stored = StoredBody::encode(Bytes::from_static(body));
        assert_eq!(stored.encoding, Some("lz4"));
        assert!(
            stored.bytes.len() * 3 < body.len(),
            "{} bytes stored",
            stored.bytes.len()
        );
        assert_eq!(
            StoredBody::decode(stored.bytes.to_vec(), stored.encoding).unwrap(),
            body
        );
        let small = StoredBody::encode(Bytes::from_static(b"{}"));
        assert_eq!((&small.bytes[..], small.encoding), (&b"{}"[..], None));
        let damaged = StoredBody::decode(vec![0xff, 0xff, 0xff, 0x7f, 1], Some("lz4")).unwrap_err();
        assert!(damaged.contains("damaged"), "{damaged}");
    }

    /// One thread's table and buffer serve bodies of every size in turn: each comes back
    /// byte for byte, a body past 64 KB (a table of wider entries) and a huge one (whose
    /// buffer is not kept) included, and one that does not shrink is stored as it came.
    #[test]
    fn bodies_of_every_size_in_turn_come_back_byte_for_byte() {
        let fixture =
            Bytes::from_static(include_bytes!("../../tests/fixtures/github/push_tag.json"));
        let mut rng = fastrand::Rng::with_seed(7);
        let noise: Vec<u8> = (0..3_000).map(|_| rng.u8(..)).collect();
        let wide = fixture.repeat(20);
        let huge = fixture.repeat(300);
        for (body, compressed) in [
            (fixture.to_vec(), true),
            (wide, true),
            (noise, false),
            (fixture.to_vec(), true),
            (huge, true),
            (fixture.to_vec(), true),
        ] {
            let stored = StoredBody::encode(Bytes::from(body.clone()));
            assert_eq!(
                stored.encoding.is_some(),
                compressed,
                "{} bytes",
                body.len()
            );
            let back = StoredBody::decode(stored.bytes.to_vec(), stored.encoding).unwrap();
            assert!(
                back == body,
                "{} bytes came back as {}",
                body.len(),
                back.len()
            );
        }
    }
}
