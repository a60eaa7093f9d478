//! Room tokens: HS256 JSON Web Tokens (RFC 7519) that let a client into a
//! room, minted by whatever backend knows the users, with any JWT library.
//!
//! A token is `BASE64URL(header).BASE64URL(claims).BASE64URL(signature)`,
//! where the header says `"alg":"HS256"` (the only algorithm accepted:
//! pinned, so `none` or an RSA-for-HMAC confusion can't get in), the
//! signature is HMAC-SHA-256 of the first two parts under the relay's room
//! secret, and the claims carry `room` (must equal the room asked for),
//! `exp` (unix seconds; the token is refused from then on) and optionally
//! `nbf` (refused before then). The same scheme as Centrifugo's channel
//! tokens.
//!
//! The cryptography is RustCrypto's `hmac` and `sha2`; the signature is
//! checked with `verify_slice`, in constant time. This module only parses
//! the envelope. Pure: the caller passes the time.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// How far a token's `exp`/`nbf` may be off the relay's clock and still
/// count, for clocks a little apart between minter and relay.
pub const LEEWAY_SECS: u64 = 5;
/// The shortest room secret accepted: HS256 wants a key of at least the
/// hash's 32 bytes (RFC 7518, 3.2).
pub const MIN_SECRET_LEN: usize = 32;
/// The longest token looked at (a datagram holds at most 1472 bytes by
/// default anyway); longer is malformed, before any decoding.
const MAX_TOKEN_LEN: usize = 2048;

/// The relay's room secret. Its bytes are never printed.
#[derive(Clone)]
pub struct RoomSecret(Vec<u8>);

impl RoomSecret {
    /// A secret from its bytes; `Err` says why they can't be one.
    pub fn new(bytes: Vec<u8>) -> Result<RoomSecret, String> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the room secret is {} bytes; HS256 needs at least {MIN_SECRET_LEN} (e.g. `openssl rand -hex 32`)",
                bytes.len()
            ));
        }
        Ok(RoomSecret(bytes))
    }

    /// Whether `other` is the same secret (in constant time: a reload
    /// compares the running secret with the file's).
    pub fn same_as(&self, other: &RoomSecret) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.0.len() && bool::from(self.0.ct_eq(&other.0))
    }

    fn mac(&self) -> Hmac<Sha256> {
        match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            // HMAC takes keys of any length.
            Err(_) => unreachable!("HMAC accepts any key length"),
        }
    }
}

impl fmt::Debug for RoomSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomSecret(<{} bytes, redacted>)", self.0.len())
    }
}

/// Why a token was refused. On the wire all of these are `token`; the
/// detail is for logs and for the client that holds the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    Malformed,
    /// The header's `alg` is not `HS256` (e.g. `none`).
    Algorithm,
    /// The signature does not match the secret.
    Signature,
    /// The token is for another room.
    Room,
    /// `exp` has passed (give or take the leeway). A token without `exp`
    /// is [`Malformed`](Self::Malformed): every token expires.
    Expired,
    /// `nbf` is still to come.
    NotYet,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "not a JWT",
            TokenError::Algorithm => "not signed with HS256",
            TokenError::Signature => "bad signature",
            TokenError::Room => "for another room",
            TokenError::Expired => "expired",
            TokenError::NotYet => "not valid yet",
        })
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// A token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The room it admits to.
    pub room: String,
    /// Unix seconds from which it is refused.
    pub exp: u64,
    /// Unix seconds before which it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Reads a token's claims without checking its signature: for a client to
/// explain a refusal of its own token, never for admission.
pub fn peek(token: &[u8]) -> Result<Claims, TokenError> {
    decode_json(split(token)?.claims)
}

/// A token's three dot-separated parts, still base64url.
struct Parts<'a> {
    header: &'a [u8],
    claims: &'a [u8],
    signature: &'a [u8],
}

fn split(token: &[u8]) -> Result<Parts<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split(|&b| b == b'.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(claims), Some(signature), None) => Ok(Parts {
            header,
            claims,
            signature,
        }),
        _ => Err(TokenError::Malformed),
    }
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &[u8]) -> Result<T, TokenError> {
    let json = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
}

/// Checks `token` for `room` at unix time `now`.
pub fn verify(secret: &RoomSecret, token: &[u8], room: &[u8], now: u64) -> Result<(), TokenError> {
    let Parts {
        header,
        claims,
        signature,
    } = split(token)?;
    let header: Header = decode_json(header)?;
    if header.alg != "HS256" {
        return Err(TokenError::Algorithm);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed)?;
    let mut mac = secret.mac();
    mac.update(&token[..header_and_claims_len(token)]);
    mac.verify_slice(&signature)
        .map_err(|_| TokenError::Signature)?;
    let claims: Claims = decode_json(claims)?;
    if claims.room.as_bytes() != room {
        return Err(TokenError::Room);
    }
    if now >= claims.exp.saturating_add(LEEWAY_SECS) {
        return Err(TokenError::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| now.saturating_add(LEEWAY_SECS) < nbf)
    {
        return Err(TokenError::NotYet);
    }
    Ok(())
}

/// The signed part of a token: everything before the last `.`.
fn header_and_claims_len(token: &[u8]) -> usize {
    token.iter().rposition(|&b| b == b'.').unwrap_or(0)
}

/// Mints a token for `claims` (what `udphub token` prints).
pub fn mint(secret: &RoomSecret, claims: &Claims) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = match serde_json::to_vec(claims) {
        Ok(json) => URL_SAFE_NO_PAD.encode(json),
        Err(e) => unreachable!("claims always serialise: {e}"),
    };
    let signed = format!("{header}.{body}");
    let mut mac = secret.mac();
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret() -> RoomSecret {
        RoomSecret::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap()
    }

    fn token(room: &str, exp: u64, nbf: Option<u64>) -> String {
        mint(
            &secret(),
            &Claims {
                room: room.into(),
                exp,
                nbf,
            },
        )
    }

    #[test]
    fn a_good_token_admits_to_its_room_only() {
        let t = token("lobby-1", 2_000, None);
        assert_eq!(verify(&secret(), t.as_bytes(), b"lobby-1", 1_000), Ok(()));
        assert_eq!(
            verify(&secret(), t.as_bytes(), b"lobby-2", 1_000),
            Err(TokenError::Room)
        );
    }

    /// A token made by PyJWT 2.15 (`jwt.encode({"room": "ops", "exp":
    /// 4102444800}, "0123456789abcdef0123456789abcdef", algorithm="HS256")`):
    /// what another library makes, byte for byte, is accepted.
    #[test]
    fn a_token_from_another_library_is_accepted() {
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb29tIjoib3BzIiwiZXhwIjo0MTAyNDQ0ODAwfQ.kf-2Z2xcEh0_Uxi4uge_BVGAMVnNrx3DIWisY-suNho";
        assert_eq!(
            verify(&secret(), t.as_bytes(), b"ops", 1_700_000_000),
            Ok(())
        );
    }

    #[test]
    fn time_claims_are_honoured_with_a_little_leeway() {
        let t = token("r", 1_000, Some(500));
        let v = |now| verify(&secret(), t.as_bytes(), b"r", now);
        assert_eq!(v(1_000 + LEEWAY_SECS), Err(TokenError::Expired));
        assert_eq!(v(999), Ok(()));
        assert_eq!(v(500 - LEEWAY_SECS - 1), Err(TokenError::NotYet));
        assert_eq!(v(500 - LEEWAY_SECS), Ok(()));
    }

    #[test]
    fn forgeries_are_refused() {
        let t = token("r", 2_000, None);
        let (signed, _) = t.rsplit_once('.').unwrap();
        let other = RoomSecret::new(vec![7; 32]).unwrap();
        assert_eq!(
            verify(&other, t.as_bytes(), b"r", 1),
            Err(TokenError::Signature)
        );
        // alg "none", empty signature.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = signed.split_once('.').unwrap().1;
        let none = format!("{none_header}.{claims}.");
        assert_eq!(
            verify(&secret(), none.as_bytes(), b"r", 1),
            Err(TokenError::Algorithm)
        );
        // Claims swapped under the old signature.
        let evil = URL_SAFE_NO_PAD.encode(br#"{"room":"r","exp":99999999999}"#);
        let swapped = format!(
            "{}.{evil}.{}",
            signed.split_once('.').unwrap().0,
            t.rsplit_once('.').unwrap().1
        );
        assert_eq!(
            verify(&secret(), swapped.as_bytes(), b"r", 1),
            Err(TokenError::Signature)
        );
        // Well signed, but without `exp`: not a token of ours.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let forever = format!("{header}.{}", URL_SAFE_NO_PAD.encode(br#"{"room":"r"}"#));
        let mut mac = secret().mac();
        mac.update(forever.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(
            verify(&secret(), format!("{forever}.{sig}").as_bytes(), b"r", 1),
            Err(TokenError::Malformed)
        );
        for garbage in [
            &b""[..],
            b"x",
            b"a.b",
            b"a.b.c.d",
            b"!!.??.**",
            &[b'a'; 5000],
        ] {
            assert_eq!(
                verify(&secret(), garbage, b"r", 1),
                Err(TokenError::Malformed),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn short_secrets_are_refused_and_secrets_are_never_printed() {
        assert!(RoomSecret::new(b"short".to_vec())
            .unwrap_err()
            .contains("32"));
        let s = format!("{:?}", secret());
        assert!(!s.contains("0123"), "{s}");
    }

    #[test]
    fn peek_reads_claims_for_explanations() {
        let t = token("r", 42, Some(7));
        let c = peek(t.as_bytes()).unwrap();
        assert_eq!((c.room.as_str(), c.exp, c.nbf), ("r", 42, Some(7)));
    }

    proptest! {
        #[test]
        fn verify_never_panics(t in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = verify(&secret(), &t, b"r", 1);
            let _ = peek(&t);
        }
    }
}
