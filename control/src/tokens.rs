//! Join tokens and the admin token: minting, hashing and constant-time comparison.
//!
//! A join token is 32 random bytes, printed as 64 hex characters. Only its SHA-256 is
//! stored, keyed by that digest: looking a token up by digest reveals nothing usable about
//! the secret, and a stolen store cannot be replayed. The admin token is compared with
//! `subtle`'s constant-time equality.

use ring::digest;
use subtle::ConstantTimeEq;

/// A fresh random secret, hex encoded.
pub fn mint() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// The digest under which a token is stored.
pub fn hash(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.trim().as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Constant-time check of a presented bearer token against the admin token: both sides
/// are hashed first so the comparison time does not depend on lengths either.
pub fn admin_token_matches(presented: &str, expected: &str) -> bool {
    hash(presented).ct_eq(&hash(expected)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_hash_stably() {
        let a = mint();
        let b = mint();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(hash(&a), hash(&format!("{a}\n")), "trailing newline from a file is ignored");
        assert_ne!(hash(&a), hash(&b));
    }

    #[test]
    fn admin_token_comparison() {
        assert!(admin_token_matches("secret", "secret"));
        assert!(!admin_token_matches("secret", "Secret"));
        assert!(!admin_token_matches("", "secret"));
    }
}
