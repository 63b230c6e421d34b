//! How a [`Node`] is encoded. Bincode writes a struct as its fields in a row,
//! without names or a count, so an added field cannot be read from data
//! written without it. A member that is no replica is written exactly as the
//! three-field `Node` was (client address, peer address, incarnation); a
//! replica is written as `REPLICA_MARK` where the client address's length
//! would be, then the three fields. No string is `u64::MAX` bytes long, so
//! the first `u64` tells the two apart. A binary from before replicas reads
//! every membership without one; one holding a replica it refuses to decode,
//! as it refuses a log entry of a command it does not know.

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Node;

/// Where an old encoding has the client address's length.
const REPLICA_MARK: u64 = u64::MAX;

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3 + usize::from(self.replica))?;
        if self.replica {
            t.serialize_element(&REPLICA_MARK)?;
        }
        t.serialize_element(&self.addr)?;
        t.serialize_element(&self.peer_addr)?;
        t.serialize_element(&self.incarnation)?;
        t.end()
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a member: client address, peer address, incarnation")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let missing = || de::Error::custom("member record ends early");
        let first: u64 = seq.next_element()?.ok_or_else(missing)?;
        let (replica, addr) = if first == REPLICA_MARK {
            (true, seq.next_element()?.ok_or_else(missing)?)
        } else {
            // `first` was the length of the client address: its bytes follow.
            let len = usize::try_from(first).map_err(de::Error::custom)?;
            let mut bytes = Vec::with_capacity(len.min(1024));
            for _ in 0..len {
                bytes.push(seq.next_element::<u8>()?.ok_or_else(missing)?);
            }
            (false, String::from_utf8(bytes).map_err(de::Error::custom)?)
        };
        Ok(Node {
            addr,
            peer_addr: seq.next_element()?.ok_or_else(missing)?,
            incarnation: seq.next_element()?.ok_or_else(missing)?,
            replica,
        })
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        // Bincode reads as many elements as the visitor asks for.
        d.deserialize_tuple(usize::MAX, NodeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// `Node` as it was before replicas, with serde's derived encoding.
    #[derive(Serialize)]
    struct Before {
        addr: String,
        peer_addr: String,
        incarnation: u64,
    }

    fn node(addr: &str, replica: bool) -> Node {
        Node {
            addr: addr.into(),
            peer_addr: "n1:7002".into(),
            incarnation: 42,
            replica,
        }
    }

    #[test]
    fn a_member_that_is_no_replica_is_encoded_as_before() {
        let before = Before {
            addr: "n1:7001".into(),
            peer_addr: "n1:7002".into(),
            incarnation: 42,
        };
        let old = bincode::serialize(&BTreeMap::from([(1u64, before)])).expect("encode");
        let new =
            bincode::serialize(&BTreeMap::from([(1u64, node("n1:7001", false))])).expect("encode");
        assert_eq!(old, new);
        let read: BTreeMap<u64, Node> = bincode::deserialize(&old).expect("decode");
        assert_eq!(read[&1], node("n1:7001", false));
    }

    #[test]
    fn replicas_and_members_round_trip_side_by_side() {
        let nodes = BTreeMap::from([
            (1u64, node("n1:7001", false)),
            (2, node("", true)),
            (3, node("n3:7001", true)),
            (4, node("", false)),
        ]);
        let bytes = bincode::serialize(&(nodes.clone(), 7u64)).expect("encode");
        let read: (BTreeMap<u64, Node>, u64) = bincode::deserialize(&bytes).expect("decode");
        assert_eq!(read, (nodes, 7));
    }

    #[test]
    fn a_truncated_record_is_an_error() {
        let bytes = bincode::serialize(&node("n1:7001", true)).expect("encode");
        for cut in 0..bytes.len() {
            assert!(
                bincode::deserialize::<Node>(&bytes[..cut]).is_err(),
                "{cut}"
            );
        }
    }
}
