//! Bootstrap tokens (kubeadm format `[a-z0-9]{6}.[a-z0-9]{16}`) and the server-side store.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

use super::sha256;
use crate::fsutil;

/// Length of the public token id.
pub const TOKEN_ID_LEN: usize = 6;
/// Length of the token secret.
pub const TOKEN_SECRET_LEN: usize = 16;
/// File name of the token store inside the deployment directory.
pub const TOKEN_STORE_FILE: &str = "tokens";
/// File name of the lock serialising changes to the token store.
pub const TOKEN_LOCK_FILE: &str = "tokens.lock";

const STORE_HEADER: &str = "# ripcord bootstrap tokens v1: <id> <sha256(secret) hex> <expires unix s> <usage limit> <uses>";
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Errors from parsing, storing or verifying bootstrap tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The string is not `[a-z0-9]{6}.[a-z0-9]{16}`; check for typos.
    #[error("malformed bootstrap token: expected [a-z0-9]{{6}}.[a-z0-9]{{16}}")]
    Malformed,
    /// No token with this id exists or its secret is wrong; ask the operator for a valid token.
    #[error("bootstrap token not recognised (unknown id or wrong secret)")]
    Unknown,
    /// The token has expired; create a new one on the server.
    #[error("bootstrap token has expired")]
    Expired,
    /// The token reached its usage limit; create a new one on the server.
    #[error("bootstrap token usage limit reached")]
    UsedUp,
    /// A token with the same id is already stored; generate a new token.
    #[error("a bootstrap token with id {id} already exists")]
    DuplicateId {
        /// The conflicting id.
        id: String,
    },
    /// The token store file already exists; use [`TokenStore::load`].
    #[error("token store {path} already exists")]
    StoreExists {
        /// Path of the store file.
        path: PathBuf,
    },
    /// Reading or writing the token store failed.
    #[error("token store I/O on {path}: {source}")]
    StoreIo {
        /// Path of the store file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The token store file is corrupt; fix or recreate it.
    #[error("token store {path} is corrupt at line {line}")]
    StoreCorrupt {
        /// Path of the store file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A token must allow at least one registration.
    #[error("a bootstrap token must allow at least one registration")]
    ZeroUses,
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Rng,
}

/// A bootstrap token `id.secret`.
///
/// `Debug` redacts the secret; `Display` prints the full token (it is what the operator
/// hands to the agent).
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    id: String,
    secret: String,
}

impl Token {
    /// Generates a fresh random token using the system CSPRNG.
    pub fn generate() -> Result<Token, TokenError> {
        let rng = SystemRandom::new();
        Ok(Token {
            id: random_chars(&rng, TOKEN_ID_LEN)?,
            secret: random_chars(&rng, TOKEN_SECRET_LEN)?,
        })
    }

    /// Parses `id.secret`.
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        let (id, secret) = s.split_once('.').ok_or(TokenError::Malformed)?;
        let ok = |part: &str, len: usize| {
            part.len() == len
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        if !ok(id, TOKEN_ID_LEN) || !ok(secret, TOKEN_SECRET_LEN) {
            return Err(TokenError::Malformed);
        }
        Ok(Token {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The token text in `file` (`-`: standard input), trimmed, at most 4 KiB read.
    /// Commands take tokens this way because a token on a command line is visible to
    /// every user of the host (`ps`, /proc). The text is not parsed here.
    pub fn read_file(file: &Path) -> io::Result<String> {
        use std::io::Read as _;
        let mut text = String::new();
        if file == Path::new("-") {
            io::stdin().take(4096).read_to_string(&mut text)?;
        } else {
            std::fs::File::open(file)?
                .take(4096)
                .read_to_string(&mut text)?;
        }
        Ok(text.trim().to_owned())
    }

    /// The public id part.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret part.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Token::parse(s)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}.<redacted>)", self.id)
    }
}

fn random_chars(rng: &SystemRandom, n: usize) -> Result<String, TokenError> {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 32];
    while out.len() < n {
        rng.fill(&mut buf).map_err(|_| TokenError::Rng)?;
        for &b in &buf {
            // Rejection sampling: 252 = 7 * 36 keeps the distribution uniform.
            if b < 252 && out.len() < n {
                out.push(ALPHABET[usize::from(b % 36)] as char);
            }
        }
    }
    Ok(out)
}

/// Constant-time equality of two 32-byte values.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One stored token: only a hash of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenRecord {
    secret_hash: [u8; 32],
    expires_at: u64,
    usage_limit: u32,
    uses: u32,
}

type Entries = BTreeMap<String, TokenRecord>;

/// Server-side bootstrap token store, persisted crash-safely in `<dir>/tokens` (mode 0600).
///
/// Secrets are stored as SHA-256 hashes and compared in constant time.
///
/// The file is the only state: every operation reads it, and every change is a
/// read-modify-write under an exclusive lock on `<dir>/tokens.lock`. So the running
/// process server and an operator's `ripcord-ps token` can both change it without losing
/// a new token or resurrecting a used one, and two registrations racing for the last use
/// of a token cannot both redeem it.
#[derive(Debug, Clone)]
pub struct TokenStore {
    path: PathBuf,
    lock_path: PathBuf,
}

impl TokenStore {
    fn at(dir: &Path) -> TokenStore {
        TokenStore {
            path: dir.join(TOKEN_STORE_FILE),
            lock_path: dir.join(TOKEN_LOCK_FILE),
        }
    }

    /// Creates an empty store in `dir`; fails with [`TokenError::StoreExists`] if one exists.
    pub fn create(dir: &Path) -> Result<TokenStore, TokenError> {
        let store = TokenStore::at(dir);
        fsutil::ensure_dir(dir).map_err(|e| store.io_err(e))?;
        let _held = store.lock()?;
        if store.path.exists() {
            return Err(TokenError::StoreExists { path: store.path });
        }
        store.persist(&Entries::new())?;
        Ok(store)
    }

    /// Opens the store in `dir`, checking that it exists and parses.
    pub fn load(dir: &Path) -> Result<TokenStore, TokenError> {
        let store = TokenStore::at(dir);
        store.read()?;
        Ok(store)
    }

    /// Opens the store in `dir`, creating an empty one if it does not exist.
    pub fn open_or_create(dir: &Path) -> Result<TokenStore, TokenError> {
        match TokenStore::create(dir) {
            Err(TokenError::StoreExists { .. }) => TokenStore::load(dir),
            other => other,
        }
    }

    /// Path of the backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Generates a new token valid for `ttl` from `now` for `usage_limit` registrations
    /// (at least 1), and persists it.
    pub fn add(
        &self,
        ttl: Duration,
        usage_limit: u32,
        now: SystemTime,
    ) -> Result<Token, TokenError> {
        loop {
            let token = Token::generate()?;
            match self.insert(&token, now + ttl, usage_limit) {
                Err(TokenError::DuplicateId { .. }) => continue,
                other => return other.map(|()| token),
            }
        }
    }

    /// Stores an existing token (e.g. one supplied by the operator) and persists the store.
    pub fn insert(
        &self,
        token: &Token,
        expires_at: SystemTime,
        usage_limit: u32,
    ) -> Result<(), TokenError> {
        if usage_limit == 0 {
            return Err(TokenError::ZeroUses);
        }
        self.update(|entries| {
            if entries.contains_key(token.id()) {
                return Err(TokenError::DuplicateId {
                    id: token.id().to_owned(),
                });
            }
            entries.insert(
                token.id().to_owned(),
                TokenRecord {
                    secret_hash: sha256(token.secret().as_bytes()),
                    expires_at: unix_secs(expires_at),
                    usage_limit,
                    uses: 0,
                },
            );
            Ok(())
        })
    }

    /// Removes a token; returns whether it existed.
    pub fn revoke(&self, id: &str) -> Result<bool, TokenError> {
        self.update(|entries| Ok(entries.remove(id).is_some()))
    }

    /// Number of successful redemptions recorded for token `id`.
    pub fn uses(&self, id: &str) -> Result<Option<u32>, TokenError> {
        Ok(self.read()?.get(id).map(|r| r.uses))
    }

    /// Checks `token` without consuming a use.
    pub fn verify(&self, token: &Token, now: SystemTime) -> Result<(), TokenError> {
        check(&self.read()?, token, now)
    }

    /// Verifies `token` and records one use, persisting the store before returning.
    pub fn redeem(&self, token: &Token, now: SystemTime) -> Result<(), TokenError> {
        self.update(|entries| {
            check(entries, token, now)?;
            if let Some(rec) = entries.get_mut(token.id()) {
                rec.uses = rec.uses.saturating_add(1);
            }
            Ok(())
        })
    }

    fn io_err(&self, source: io::Error) -> TokenError {
        TokenError::StoreIo {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<ripcord_crashsafe::FileLock, TokenError> {
        ripcord_crashsafe::lock_exclusive(&self.lock_path).map_err(|source| TokenError::StoreIo {
            path: self.lock_path.clone(),
            source,
        })
    }

    /// Read-modify-write under the lock; the file is rewritten only if `change` succeeds.
    fn update<R>(
        &self,
        change: impl FnOnce(&mut Entries) -> Result<R, TokenError>,
    ) -> Result<R, TokenError> {
        let _held = self.lock()?;
        let mut entries = self.read()?;
        let result = change(&mut entries)?;
        self.persist(&entries)?;
        Ok(result)
    }

    fn read(&self) -> Result<Entries, TokenError> {
        let text = fsutil::read_text(&self.path).map_err(|e| self.io_err(e))?;
        let mut entries = Entries::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let corrupt = || TokenError::StoreCorrupt {
                path: self.path.clone(),
                line: i + 1,
            };
            let (id, rec) = parse_record(line).ok_or_else(corrupt)?;
            if entries.insert(id, rec).is_some() {
                return Err(corrupt());
            }
        }
        Ok(entries)
    }

    fn persist(&self, entries: &Entries) -> Result<(), TokenError> {
        let mut text = String::from(STORE_HEADER);
        text.push('\n');
        for (id, r) in entries {
            text.push_str(&format!(
                "{id} {} {} {} {}\n",
                hex::encode(r.secret_hash),
                r.expires_at,
                r.usage_limit,
                r.uses
            ));
        }
        fsutil::write_atomic(&self.path, text.as_bytes(), fsutil::MODE_SECRET)
            .map_err(|e| self.io_err(e))
    }
}

/// The secret is checked (in constant time) before expiry and usage so that a caller
/// knowing only the id learns nothing about the token's state.
fn check(entries: &Entries, token: &Token, now: SystemTime) -> Result<(), TokenError> {
    let rec = entries.get(token.id()).ok_or(TokenError::Unknown)?;
    if !ct_eq(&rec.secret_hash, &sha256(token.secret().as_bytes())) {
        return Err(TokenError::Unknown);
    }
    if unix_secs(now) >= rec.expires_at {
        return Err(TokenError::Expired);
    }
    if rec.uses >= rec.usage_limit {
        return Err(TokenError::UsedUp);
    }
    Ok(())
}

fn parse_record(line: &str) -> Option<(String, TokenRecord)> {
    let mut it = line.split_ascii_whitespace();
    let id = it.next()?;
    let hash = it.next()?;
    let expires = it.next()?;
    let limit = it.next()?;
    let uses = it.next()?;
    if it.next().is_some()
        || id.len() != TOKEN_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return None;
    }
    let mut secret_hash = [0u8; 32];
    hex::decode_to_slice(hash, &mut secret_hash).ok()?;
    Some((
        id.to_owned(),
        TokenRecord {
            secret_hash,
            expires_at: expires.parse().ok()?,
            // "-" (unlimited) was written by versions before tokens became single-use;
            // such a token keeps working until it expires.
            usage_limit: if limit == "-" {
                u32::MAX
            } else {
                limit.parse().ok()?
            },
            uses: uses.parse().ok()?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_have_kubeadm_format_and_roundtrip() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let t = Token::generate().unwrap();
            let s = t.to_string();
            assert_eq!(s.len(), 23);
            assert_eq!(&s[6..7], ".");
            assert!(
                s.bytes()
                    .enumerate()
                    .all(|(i, b)| i == 6 || b.is_ascii_lowercase() || b.is_ascii_digit())
            );
            assert_eq!(Token::parse(&s).unwrap(), t);
            assert!(seen.insert(s));
        }
    }

    #[test]
    fn parse_rejects_malformed() {
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "abcdef0123456789abcdef",
            "abcde.0123456789abcdef",
            "abcdefg.0123456789abcdef",
            "abcdef.0123456789abcde",
            "abcdef.0123456789abcdefg",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789ABCDEF",
            "abc-ef.0123456789abcdef",
            "abcdef.0123456789abcde.",
            "abcdef:0123456789abcdef",
            " abcdef.0123456789abcdef",
            "abcdef.0123456789abcdé",
        ] {
            assert!(
                matches!(Token::parse(bad), Err(TokenError::Malformed)),
                "{bad:?}"
            );
        }
        let t = Token::parse("abcdef.0123456789abcdef").unwrap();
        assert_eq!(t.id(), "abcdef");
        assert_eq!(t.secret(), "0123456789abcdef");
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn store_verify_expiry_usage_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let store = TokenStore::create(dir.path()).unwrap();
        assert!(matches!(
            TokenStore::create(dir.path()),
            Err(TokenError::StoreExists { .. })
        ));
        assert!(matches!(
            store.add(Duration::from_secs(3600), 0, now),
            Err(TokenError::ZeroUses)
        ));
        let t = store.add(Duration::from_secs(3600), 2, now).unwrap();
        store.verify(&t, now).unwrap();
        let wrong = Token::parse(&format!("{}.{}", t.id(), "0000000000000000")).unwrap();
        assert!(matches!(
            store.verify(&wrong, now),
            Err(TokenError::Unknown)
        ));
        let unknown = Token::generate().unwrap();
        assert!(matches!(
            store.verify(&unknown, now),
            Err(TokenError::Unknown)
        ));
        assert!(matches!(
            store.verify(&t, now + Duration::from_secs(3601)),
            Err(TokenError::Expired)
        ));
        store.redeem(&t, now).unwrap();
        // Reload: uses survive.
        let store = TokenStore::load(dir.path()).unwrap();
        assert_eq!(store.uses(t.id()).unwrap(), Some(1));
        store.redeem(&t, now).unwrap();
        assert!(matches!(store.redeem(&t, now), Err(TokenError::UsedUp)));
        assert_eq!(store.uses(t.id()).unwrap(), Some(2));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(store.revoke(t.id()).unwrap());
        assert!(matches!(store.verify(&t, now), Err(TokenError::Unknown)));
        // Raw secret never hits the disk.
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(t.secret()));
    }

    #[test]
    fn corrupt_store_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(TOKEN_STORE_FILE),
            "# hdr\nabcdef zz 1 - 0\n",
        )
        .unwrap();
        assert!(matches!(
            TokenStore::load(dir.path()),
            Err(TokenError::StoreCorrupt { line: 2, .. })
        ));
    }

    /// The attacker is a second host that learnt a single-use token; the race is the
    /// running server (one handle) and an operator's `ripcord-ps token` (another handle).
    #[test]
    fn server_and_operator_share_the_store_without_lost_or_resurrected_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let server = TokenStore::create(dir.path()).unwrap();
        let first = server.add(Duration::from_secs(3600), 1, now).unwrap();
        // The operator adds tokens while the server runs.
        let operator = TokenStore::load(dir.path()).unwrap();
        let minted: Vec<Token> = (0..5)
            .map(|_| operator.add(Duration::from_secs(3600), 1, now).unwrap())
            .collect();
        // The server redeems the first: the operator's tokens must survive its write.
        server.redeem(&first, now).unwrap();
        for t in &minted {
            server.verify(t, now).unwrap();
        }
        // ... and the operator's next write must not resurrect the used token.
        operator.add(Duration::from_secs(3600), 1, now).unwrap();
        assert!(matches!(
            server.redeem(&first, now),
            Err(TokenError::UsedUp)
        ));
        // Two registrations racing for one use: exactly one wins.
        let contested = server.add(Duration::from_secs(3600), 1, now).unwrap();
        let wins: usize = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    let (store, token) = (TokenStore::load(dir.path()).unwrap(), &contested);
                    scope.spawn(move || store.redeem(token, now).is_ok())
                })
                .collect();
            racers
                .into_iter()
                .map(|r| usize::from(r.join().unwrap()))
                .sum()
        });
        assert_eq!(wins, 1);
    }

    #[test]
    fn tokens_from_before_single_use_keep_their_unlimited_uses() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::create(dir.path()).unwrap();
        let t = Token::parse("abcdef.0123456789abcdef").unwrap();
        let hash = hex::encode(sha256(t.secret().as_bytes()));
        std::fs::write(
            store.path(),
            format!("# old\nabcdef {hash} {} - 7\n", u64::MAX / 2),
        )
        .unwrap();
        store.redeem(&t, SystemTime::now()).unwrap();
        assert_eq!(store.uses("abcdef").unwrap(), Some(8));
    }
}
