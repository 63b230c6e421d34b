//! How every value Roster keeps on disk is encoded: a CRC32 of the bincode
//! bytes, then those bytes. Damage is reported as damage instead of being decoded
//! into wrong values (sled checks its own log records, not what survives its recovery).

use serde::de::DeserializeOwned;
use serde::Serialize;

const CRC_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode: {0}")]
    Encode(bincode::Error),
    #[error("record of {0} bytes is too short for its checksum")]
    Short(usize),
    #[error("checksum mismatch")]
    Checksum,
    #[error("checksum matches but the record does not decode: {0}")]
    Decode(bincode::Error),
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    let size = bincode::serialized_size(v).map_err(CodecError::Encode)?;
    let mut out = Vec::with_capacity(CRC_LEN + size as usize);
    out.extend_from_slice(&[0; CRC_LEN]);
    bincode::serialize_into(&mut out, v).map_err(CodecError::Encode)?;
    let crc = crc32fast::hash(&out[CRC_LEN..]);
    out[..CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    let (crc, body) = match b.split_first_chunk::<CRC_LEN>() {
        Some(split) => split,
        None => return Err(CodecError::Short(b.len())),
    };
    if u32::from_le_bytes(*crc) != crc32fast::hash(body) {
        return Err(CodecError::Checksum);
    }
    bincode::deserialize(body).map_err(CodecError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_any_flipped_bit() {
        let v = (42u64, "instance".to_string(), Some(7u32));
        let b = encode(&v).expect("encode");
        assert_eq!(decode::<(u64, String, Option<u32>)>(&b).expect("decode"), v);
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut d = b.clone();
                d[i] ^= 1 << bit;
                assert!(
                    decode::<(u64, String, Option<u32>)>(&d).is_err(),
                    "flip of bit {bit} in byte {i} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncated_and_empty_records_are_errors() {
        let b = encode(&123u64).expect("encode");
        assert!(matches!(decode::<u64>(&b[..3]), Err(CodecError::Short(3))));
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Short(0))));
        assert!(matches!(
            decode::<u64>(&b[..b.len() - 1]),
            Err(CodecError::Checksum)
        ));
    }

    #[test]
    fn a_valid_checksum_over_the_wrong_type_is_a_decode_error() {
        let b = encode(&1u8).expect("encode");
        assert!(matches!(decode::<u64>(&b), Err(CodecError::Decode(_))));
    }
}
