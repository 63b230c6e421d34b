//! The protobuf codec of every generated service: prost's, except that a
//! message that does not decode is the sender's fault, `INVALID_ARGUMENT`,
//! where tonic says `INTERNAL` (which a client would take for a server bug).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder as TonicDecoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(ProstDecoder::default())
    }
}

pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> TonicDecoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| match s.code() {
            Code::Internal => Status::invalid_argument(format!(
                "the message is not a valid protobuf {}: {}; check the client's copy of proto/",
                std::any::type_name::<U>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message"),
                s.message()
            )),
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// What the server's watch streams send in place of the generated messages
/// (build.rs maps them for the servers only): a `WatchResponse` encoded once
/// and shared by every stream that sends it, so a change reaching thousands
/// of streams is encoded once per service, not once per stream.
#[cfg(feature = "server")]
pub mod encoded {
    use std::sync::Arc;

    use bytes::{BufMut, Bytes};
    use prost::encoding::{self, DecodeContext, WireType};
    use prost::{DecodeError, Message};

    use crate::proto::v1 as pb;

    /// A message's encoding, made once and shared by every stream that sends it.
    pub trait Encoded: Send + Sync {
        fn encoded(&self) -> &[u8];
    }

    impl Encoded for Bytes {
        fn encoded(&self) -> &[u8] {
            self
        }
    }

    /// An encoded `roster.v1.WatchResponse`.
    #[derive(Clone)]
    pub struct WatchResponse(pub Arc<dyn Encoded>);

    impl WatchResponse {
        /// `m`, encoded for this stream alone.
        pub fn own(m: &pb::WatchResponse) -> Self {
            WatchResponse(Arc::new(Bytes::from(m.encode_to_vec())))
        }
    }

    impl std::fmt::Debug for WatchResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "WatchResponse({} bytes)", self.0.encoded().len())
        }
    }

    /// The server encodes these, never decodes them.
    fn never_decoded(
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    impl Message for WatchResponse {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            buf.put_slice(self.0.encoded());
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl bytes::Buf,
            ctx: DecodeContext,
        ) -> Result<(), DecodeError> {
            never_decoded(tag, wire_type, buf, ctx)
        }

        fn encoded_len(&self) -> usize {
            self.0.encoded().len()
        }

        fn clear(&mut self) {
            self.0 = Arc::new(Bytes::new());
        }
    }

    /// A `roster.v1.WatchServicesResponse`: an update around a shared
    /// encoded `WatchResponse`, or any other answer as generated.
    #[derive(Clone, Debug)]
    pub enum WatchServicesResponse {
        Update {
            /// The watcher's own key for the service, shared: the namespace
            /// (`namespace_end` bytes, none for `default`), a separator,
            /// then the service's name.
            key: Arc<str>,
            namespace_end: usize,
            update: WatchResponse,
        },
        Other(pb::WatchServicesResponse),
    }

    /// A key's namespace (empty for `default`) and service.
    fn parts(key: &str, namespace_end: usize) -> (&str, &str) {
        match namespace_end {
            0 => ("", key),
            n => (&key[..n], &key[n + 1..]),
        }
    }

    /// A length-delimited field holding `bytes`.
    fn put_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
        encoding::encode_key(tag, WireType::LengthDelimited, buf);
        encoding::encode_varint(bytes.len() as u64, buf);
        buf.put_slice(bytes);
    }

    fn field_len(tag: u32, len: usize) -> usize {
        encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
    }

    /// The fields' numbers in `WatchServicesResponse` (registry.proto).
    const SERVICE: u32 = 1;
    const UPDATE: u32 = 2;
    const NAMESPACE: u32 = 4;

    impl Message for WatchServicesResponse {
        fn encode_raw(&self, buf: &mut impl BufMut) {
            match self {
                Self::Update {
                    key,
                    namespace_end,
                    update,
                } => {
                    let (ns, service) = parts(key, *namespace_end);
                    if !service.is_empty() {
                        put_field(SERVICE, service.as_bytes(), buf);
                    }
                    put_field(UPDATE, update.0.encoded(), buf);
                    if !ns.is_empty() {
                        put_field(NAMESPACE, ns.as_bytes(), buf);
                    }
                }
                Self::Other(m) => m.encode_raw(buf),
            }
        }

        fn merge_field(
            &mut self,
            tag: u32,
            wire_type: WireType,
            buf: &mut impl bytes::Buf,
            ctx: DecodeContext,
        ) -> Result<(), DecodeError> {
            never_decoded(tag, wire_type, buf, ctx)
        }

        fn encoded_len(&self) -> usize {
            match self {
                Self::Update {
                    key,
                    namespace_end,
                    update,
                } => {
                    let (ns, service) = parts(key, *namespace_end);
                    let len = |tag, s: &str| {
                        if s.is_empty() {
                            0
                        } else {
                            field_len(tag, s.len())
                        }
                    };
                    len(SERVICE, service)
                        + len(NAMESPACE, ns)
                        + field_len(UPDATE, update.0.encoded().len())
                }
                Self::Other(m) => m.encoded_len(),
            }
        }

        fn clear(&mut self) {
            *self = Self::Other(pb::WatchServicesResponse::default());
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use pb::watch_services_response::Result as Outcome;

        fn response() -> pb::WatchResponse {
            pb::WatchResponse {
                revision: 42,
                reset: pb::ResetReason::Initial as i32,
                instances: vec![pb::Instance {
                    service: "web".into(),
                    id: "web-1".into(),
                    address: "10.0.0.1".into(),
                    port: 8080,
                    ..Default::default()
                }],
                events: vec![],
                compact_revision: 7,
            }
        }

        /// The shared bytes decode, for a client, as the generated messages would.
        #[test]
        fn encodings_match_the_generated_messages() {
            let m = response();
            let shared = WatchResponse::own(&m);
            assert_eq!(shared.encode_to_vec(), m.encode_to_vec());
            // Catalogue keys: the service and namespace go out apart.
            for (key, namespace_end, service, namespace) in [
                ("web", 0, "web", ""),
                ("", 0, "", ""),
                ("team-a/web", 6, "web", "team-a"),
            ] {
                let mux = WatchServicesResponse::Update {
                    key: key.into(),
                    namespace_end,
                    update: shared.clone(),
                };
                let generated = pb::WatchServicesResponse {
                    service: service.into(),
                    namespace: namespace.into(),
                    result: Some(Outcome::Update(m.clone())),
                };
                let bytes = mux.encode_to_vec();
                assert_eq!(bytes.len(), mux.encoded_len());
                assert_eq!(bytes, generated.encode_to_vec());
                assert_eq!(
                    pb::WatchServicesResponse::decode(bytes.as_slice()).expect("decodes"),
                    generated
                );
            }
        }
    }
}
