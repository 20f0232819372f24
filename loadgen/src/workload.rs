//! Request bodies: events with unique ids, alone or batched, JSON or NDJSON,
//! optionally gzipped.

use std::io::Write;

use bytes::Bytes;

use crate::args::{BatchFormat, Plan};

/// One request ready to send.
#[derive(Debug, Clone)]
pub(crate) struct Payload {
    /// Path to POST to.
    pub(crate) path: &'static str,
    /// `Content-Type`.
    pub(crate) content_type: &'static str,
    /// Whether the body is gzipped.
    pub(crate) gzip: bool,
    /// The body.
    pub(crate) body: Bytes,
    /// Number of the first event; the request holds `first..first + count`.
    pub(crate) first: u64,
    /// Events in the request.
    pub(crate) count: usize,
}

/// Builds request bodies for a plan.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    plan: Plan,
    /// The payload text, JSON-escaped once.
    payload_json: String,
}

impl Workload {
    pub(crate) fn new(plan: &Plan) -> Self {
        // Printable, varied, ASCII: exercises the uppercase fast path the
        // way machine-generated events do.
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789 =;-";
        let payload: String = (0..plan.payload_bytes)
            .map(|i| ALPHABET[(i * 7 + i / 13) % ALPHABET.len()] as char)
            .collect();
        Self {
            plan: plan.clone(),
            payload_json: serde_json::Value::from(payload).to_string(),
        }
    }

    fn write_event(&self, out: &mut Vec<u8>, n: u64) {
        let id = serde_json::Value::from(self.plan.id(n)).to_string();
        let _ = write!(
            out,
            r#"{{"id":{id},"timestamp":{},"payload":{}}}"#,
            1_700_000_000 + n as i64 % 86_400,
            self.payload_json
        );
    }

    /// The request carrying events `first..first + batch_size`.
    pub(crate) fn request(&self, first: u64) -> Payload {
        let size = self.plan.batch_size;
        let mut body = Vec::with_capacity(size * (self.payload_json.len() + 80));
        if size == 1 {
            self.write_event(&mut body, first);
            return Payload {
                path: "/events",
                content_type: "application/json",
                gzip: false,
                body: Bytes::from(body),
                first,
                count: 1,
            };
        }
        let content_type = match self.plan.format {
            BatchFormat::Json => {
                body.push(b'[');
                for i in 0..size as u64 {
                    if i > 0 {
                        body.push(b',');
                    }
                    self.write_event(&mut body, first + i);
                }
                body.push(b']');
                "application/json"
            }
            BatchFormat::Ndjson => {
                for i in 0..size as u64 {
                    self.write_event(&mut body, first + i);
                    body.push(b'\n');
                }
                "application/x-ndjson"
            }
        };
        let body = if self.plan.gzip {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::fast(),
            );
            // Writing to a Vec cannot fail.
            let _ = encoder.write_all(&body);
            encoder.finish().unwrap_or_default()
        } else {
            body
        };
        Payload {
            path: "/events/batch",
            content_type,
            gzip: self.plan.gzip,
            body: Bytes::from(body),
            first,
            count: size,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use clap::Parser;

    use super::*;
    use crate::args::Args;

    fn workload(args: &[&str]) -> Workload {
        let mut argv = vec!["eventflow-loadgen"];
        argv.extend_from_slice(args);
        Workload::new(&Args::try_parse_from(argv).unwrap().plan("t").unwrap())
    }

    #[test]
    fn single_events_are_valid_json_with_the_payload_size() {
        let w = workload(&["--payload-bytes", "100"]);
        let p = w.request(5);
        assert_eq!((p.path, p.count, p.first), ("/events", 1, 5));
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["id"], "lg-t-5");
        assert_eq!(v["payload"].as_str().unwrap().len(), 100);
        assert!(v["timestamp"].is_i64());
    }

    #[test]
    fn batches_in_both_formats_and_gzip() {
        let p = workload(&["-b", "3"]).request(10);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&p.body).unwrap();
        let ids: Vec<&str> = v.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["lg-t-10", "lg-t-11", "lg-t-12"]);
        assert_eq!(p.path, "/events/batch");

        let p = workload(&["-b", "3", "--format", "ndjson", "--gzip"]).request(0);
        assert!(p.gzip);
        let mut text = String::new();
        flate2::read::GzDecoder::new(&p.body[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.lines().count(), 3);
        assert_eq!(p.content_type, "application/x-ndjson");
    }
}
