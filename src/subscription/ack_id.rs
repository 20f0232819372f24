//! Ack ids: what a consumer acks or nacks a lease with. Each backend has
//! its own form, parsed strictly, so that a string this service never
//! issued is told apart (422) from a lease that is no longer live
//! (`expired`).

use std::fmt;

/// Most characters an ack id of any backend has.
pub const ACK_ID_MAX: usize = 128;

/// A lease's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckId {
    /// A lease of the in-process subscriptions: `m1.{sequence}.{lease}`.
    Memory {
        /// The event's publication sequence.
        sequence: u64,
        /// The lease's number (unique in the process).
        lease: u64,
    },
    /// A JetStream delivery: `n1.{p|r}.{delivered}.{stream_seq}.{consumer_seq}.{timestamp}.{pending}`,
    /// the numbers of its ack subject, so that any replica can ack it.
    Nats(NatsDelivery),
}

/// The numbers of a JetStream delivery's ack subject
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<timestamp>.<pending>`);
/// the stream and consumer follow from the subscription named in the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NatsDelivery {
    /// From the subscription's redelivered dead letters (`r`), not the
    /// published stream (`p`).
    pub redelivery: bool,
    /// Deliveries so far, this one included.
    pub delivered: u64,
    /// The message's sequence in its stream.
    pub stream_seq: u64,
    /// The delivery's sequence in its consumer.
    pub consumer_seq: u64,
    /// When the message was stored (Unix nanoseconds).
    pub timestamp: u64,
    /// Messages pending for the consumer then.
    pub pending: u64,
}

impl AckId {
    /// The ack id `raw`, if this service could have issued it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let not_ours = || {
            format!(
                "`{}` is not an ack_id this service issued",
                crate::event::clip(raw)
            )
        };
        if raw.len() > ACK_ID_MAX {
            return Err(not_ours());
        }
        let mut parts = raw.split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("m1"), Some(sequence), Some(lease), None) => Ok(Self::Memory {
                sequence: number(sequence).ok_or_else(not_ours)?,
                lease: number(lease).ok_or_else(not_ours)?,
            }),
            (Some("n1"), Some(kind @ ("p" | "r")), Some(_), Some(_)) => {
                let numbers: Vec<u64> = raw
                    .splitn(3, '.')
                    .nth(2)
                    .unwrap_or_default()
                    .split('.')
                    .map(wide_number)
                    .collect::<Option<_>>()
                    .ok_or_else(not_ours)?;
                let [delivered, stream_seq, consumer_seq, timestamp, pending] = numbers[..] else {
                    return Err(not_ours());
                };
                Ok(Self::Nats(NatsDelivery {
                    redelivery: kind == "r",
                    delivered,
                    stream_seq,
                    consumer_seq,
                    timestamp,
                    pending,
                }))
            }
            _ => Err(not_ours()),
        }
    }
}

impl NatsDelivery {
    /// The ack subject of this delivery of `stream`'s consumer `consumer`.
    pub fn ack_subject(&self, stream: &str, consumer: &str) -> String {
        format!(
            "$JS.ACK.{stream}.{consumer}.{}.{}.{}.{}.{}",
            self.delivered, self.stream_seq, self.consumer_seq, self.timestamp, self.pending
        )
    }
}

/// A decimal u64 of at most 18 digits, written the one way this service
/// writes it.
fn number(text: &str) -> Option<u64> {
    (text.len() <= 18).then(|| wide_number(text)).flatten()
}

/// A decimal of at most 19 digits (always a u64; JetStream's timestamps
/// take 19), written the one way this service writes it.
fn wide_number(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.len() <= 19
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

impl fmt::Display for AckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory { sequence, lease } => write!(f, "m1.{sequence}.{lease}"),
            Self::Nats(d) => write!(
                f,
                "n1.{}.{}.{}.{}.{}.{}",
                if d.redelivery { "r" } else { "p" },
                d.delivered,
                d.stream_seq,
                d.consumer_seq,
                d.timestamp,
                d.pending
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_id_reads_back() {
        let id = AckId::Memory {
            sequence: 42,
            lease: 7,
        };
        assert_eq!(AckId::parse(&id.to_string()), Ok(id));
        let id = AckId::Nats(NatsDelivery {
            redelivery: true,
            delivered: 3,
            stream_seq: 100,
            consumer_seq: 7,
            timestamp: 1_790_230_470_084_404_000,
            pending: 0,
        });
        assert_eq!(AckId::parse(&id.to_string()), Ok(id));
        assert_eq!(
            AckId::parse("n1.p.1.2.3.4.5").map(|id| id.to_string()),
            Ok("n1.p.1.2.3.4.5".to_owned())
        );
    }

    #[test]
    fn a_nats_id_names_its_ack_subject_on_the_subscriptions_consumer() {
        let Ok(AckId::Nats(delivery)) = AckId::parse("n1.p.2.10.12.1790230470084404000.3") else {
            panic!("not parsed");
        };
        assert_eq!(
            delivery.ack_subject("EVENTFLOW_PUBLISHED", "sub_orders"),
            "$JS.ACK.EVENTFLOW_PUBLISHED.sub_orders.2.10.12.1790230470084404000.3"
        );
    }

    #[test]
    fn anything_else_is_not_ours() {
        for raw in [
            "",
            "m1",
            "m1.1",
            "m1.1.2.3",
            "m2.1.2",
            "m1.01.2",
            "m1.-1.2",
            "m1.1.99999999999999999999",
            "m1. 1.2",
            "n1.p.1.2.3.4",
            "n1.p.1.2.3.4.5.6",
            "n1.x.1.2.3.4.5",
            "n1.p.1.2.3.4.18446744073709551616",
            "n1.p.1.2.3.4.05",
            "n1.p.1.2.EVENTFLOW.4.5",
        ] {
            assert!(AckId::parse(raw).is_err(), "{raw:?}");
        }
    }
}
