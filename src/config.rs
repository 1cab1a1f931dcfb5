//! Configuration: a TOML file, then `PARASOL__SECTION__KEY` environment overrides, then
//! validation, giving one [`Config`] the rest of the crate trusts.
//!
//! Every key is optional and every default works on a fresh machine. Unknown keys are an error
//! (a typo such as `disk_byte` must not silently fall back to a default), and every error names
//! the key it is about, as `cache.disk_bytes`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use url::Url;

mod cache;
mod compat;
mod feed;
mod fetch;
mod media;
mod moderation;
mod server;
mod values;

pub use cache::*;
pub use compat::*;
pub use feed::*;
pub use fetch::*;
pub use media::*;
pub use moderation::*;
pub use server::*;
pub use values::*;

/// The file read when `--config` is not given, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/parasol.toml";

/// Prefix of environment overrides: `PARASOL__CACHE__DISK_BYTES=20GiB` sets `cache.disk_bytes`.
const ENV_PREFIX: &str = "PARASOL__";

/// The whole configuration, one struct per TOML section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: where parasol listens and how it names itself.
    pub server: ServerConfig,
    /// `[signing]`: the keys of native URLs.
    pub signing: SigningConfig,
    /// `[cache]`: the memory and disk tiers.
    pub cache: CacheConfig,
    /// `[fetch]`: how parasol talks to origins.
    pub fetch: FetchConfig,
    /// `[policy]`: which origins may be fetched, and which URLs share an entry.
    pub policy: PolicyConfig,
    /// `[media]`: what may be served, and the media workers.
    pub media: MediaConfig,
    /// Server-defined renditions by name; the five Misskey-compatible presets are always
    /// there unless redefined.
    pub variants: std::collections::BTreeMap<String, VariantConfig>,
    /// `[compat]`: other media proxies' URL schemes.
    pub compat: CompatConfig,
    /// `[audit]`: the outbound request log.
    pub audit: AuditConfig,
    /// `[shared]`: the bucket several nodes share.
    pub shared: SharedConfig,
    /// `[moderation]`: hash lists, the scanner, the moderation log.
    pub moderation: ModerationConfig,
    /// `[[upstream]]`: path prefixes served from one fixed origin (an instance's own bucket).
    pub upstream: Vec<UpstreamConfig>,
    /// `[[feed]]`: instances' timelines followed, to fetch media when a post arrives.
    pub feed: Vec<FeedConfig>,
    /// `[telemetry]`: traces over OTLP.
    pub telemetry: TelemetryConfig,
}

/// A configuration problem, always naming the key or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not TOML (where, and what was expected; never the line itself).
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's complaint.
        message: String,
    },
    /// A key has a value it may not have.
    #[error("config key `{key}`: {message}")]
    Key {
        /// The key, dotted (`fetch.timeout`).
        key: String,
        /// What is wrong with its value.
        message: String,
    },
}

impl Config {
    /// Loads `path`, or `config/parasol.toml` when present, or the built-in defaults; then
    /// applies `PARASOL__*` overrides from the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (name, text) = match path {
            Some(p) => (p.display().to_string(), read(p)?),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                (DEFAULT_CONFIG_PATH.to_string(), read(Path::new(DEFAULT_CONFIG_PATH))?)
            }
            None => ("(built-in defaults)".to_string(), String::new()),
        };
        Self::from_sources(&name, &text, std::env::vars())
    }

    /// Parses TOML `text` (named `name` in errors), overlays `env` pairs whose names start with
    /// `PARASOL__`, and validates. Tests call this directly with their own environment.
    pub fn from_sources(
        name: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| syntax_error(name, text, &e))?;
        // Overrides whose text was read as a TOML number, boolean or array: if the key turns
        // out to want a string (`PARASOL__SERVER__ADMIN_TOKEN=123456`), the raw text is used.
        let mut typed = Vec::new();
        for (var, value) in env {
            if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
                if let Some(key) = overlay(&mut table, &var, rest, &value)? {
                    typed.push((key, value));
                }
            }
        }
        loop {
            let error = match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
                Ok(config) => {
                    let mut config: Config = config;
                    for (name, spec) in default_variants() {
                        config.variants.entry(name).or_insert(spec);
                    }
                    config.validate()?;
                    return Ok(config);
                }
                Err(e) => e,
            };
            let key = error.path().to_string();
            match typed.iter().position(|((section, k), _)| key == format!("{section}.{k}")) {
                Some(i) => {
                    let ((section, k), value) = typed.swap_remove(i);
                    if let Some(toml::Value::Table(t)) = table.get_mut(&section) {
                        t.insert(k, toml::Value::String(value));
                    }
                }
                None => {
                    // A secret's value is never echoed, not even the wrong one.
                    let message = match is_secret(&key) {
                        true if key.starts_with("signing.keys") => {
                            "must be a list of strings (value not shown)"
                        }
                        true => "must be a string (value not shown)",
                        false => {
                            return Err(ConfigError::Key {
                                key,
                                message: error.into_inner().to_string(),
                            });
                        }
                    };
                    return Err(ConfigError::Key { key, message: message.into() });
                }
            }
        }
    }

    /// Cross-field and value checks the types alone cannot express: each section checks
    /// itself, the compat section against the variants it names.
    fn validate(&self) -> Result<(), ConfigError> {
        self.server.check()?;
        self.signing.check()?;
        self.cache.check()?;
        self.fetch.check()?;
        self.policy.check()?;
        check_variants(&self.variants)?;
        self.compat.check(&self.variants)?;
        self.shared.check()?;
        for (i, u) in self.upstream.iter().enumerate() {
            u.check().or_else(|message| bad(&format!("upstream[{i}]"), message))?;
        }
        self.moderation.check()?;
        self.telemetry.check()?;
        for (i, f) in self.feed.iter().enumerate() {
            f.check().or_else(|message| bad(&format!("feed[{i}]"), message))?;
        }
        self.media.check()
    }

    /// Where the moderation log is written.
    pub fn moderation_log_path(&self) -> PathBuf {
        self.moderation.log.clone().unwrap_or_else(|| self.cache.dir.join("moderation.jsonl"))
    }

    /// Where the outbound audit log is written.
    pub fn audit_path(&self) -> PathBuf {
        self.audit.path.clone().unwrap_or_else(|| self.cache.dir.join("outbound.jsonl"))
    }

    /// The effective configuration as TOML, with every secret replaced by `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })
}

/// Keys whose values are secrets: redacted in `check-config`, never quoted in an error.
/// `[[upstream]]` keys are numbered: [`is_secret`] matches them by their end.
const SECRETS: &[&str] = &[
    "server.admin_token",
    "signing.keys",
    "compat.camo_key",
    "compat.akkoma_secret",
    "compat.purge_token",
    "compat.pictrs_secret",
    "shared.secret_access_key",
    "upstream[*].s3.secret_access_key",
    "feed[*].url",
    "feed[*].token",
    "telemetry.otlp_headers",
];

/// Whether the value at `key` (as serde names it: `upstream[0].s3.secret_access_key`) is a
/// secret.
fn is_secret(key: &str) -> bool {
    SECRETS.iter().any(|s| match s.split_once("[*]") {
        Some((list, rest)) => key
            .strip_prefix(list)
            .and_then(|k| k.strip_prefix('['))
            .and_then(|k| k.split_once(']'))
            .is_some_and(|(n, k)| n.bytes().all(|b| b.is_ascii_digit()) && k.starts_with(rest)),
        None => key.starts_with(s),
    })
}

/// A TOML syntax error by line and column and what was expected, without the line itself:
/// the line may hold a secret.
fn syntax_error(name: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |span| span.start).min(text.len());
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = at - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
    let what = e.message().lines().next().unwrap_or("syntax error").trim();
    ConfigError::Syntax {
        path: name.to_string(),
        message: format!("line {line}, column {column}: {what}"),
    }
}

/// Sets `section.key` in `table` from one environment variable. The value is read as a TOML
/// value when it is one (`true`, `5`, `["127.0.0.2/32"]`) and as a string otherwise (`20GiB`).
/// Returns the `(section, key)` when the value was read as a non-string TOML value.
fn overlay(
    table: &mut toml::Table,
    var: &str,
    rest: &str,
    value: &str,
) -> Result<Option<(String, String)>, ConfigError> {
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    let [section, key] = path.as_slice() else {
        return Err(ConfigError::Key {
            key: var.into(),
            message: "environment overrides take the form PARASOL__SECTION__KEY".into(),
        });
    };
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let section_table =
        table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let was_typed = !parsed.is_str();
    match section_table {
        toml::Value::Table(t) => {
            t.insert(key.clone(), parsed);
            Ok(was_typed.then(|| (section.clone(), key.clone())))
        }
        _ => Err(ConfigError::Key { key: section.clone(), message: "is not a section".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::from_sources("none", "", env(&[])).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.cache.memory_bytes, Size(256 << 20));
        assert!(c.signing.keys.is_empty());
    }

    #[test]
    fn sizes_durations_and_env_overrides() {
        let text =
            "[cache]\nmemory_bytes = \"64 MiB\"\nretention = \"2d\"\nmax_object_bytes = 1000\n";
        let c = Config::from_sources(
            "t",
            text,
            env(&[
                ("PARASOL__CACHE__DISK_BYTES", "20GiB"),
                ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.2/32\"]"),
                ("PARASOL__FETCH__MAX_REDIRECTS", "2"),
                ("PARASOL__SERVER__ADMIN_TOKEN", "12345678901234567890123456789012"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.cache.memory_bytes, Size(64 << 20));
        assert_eq!(c.cache.retention, Dur(Duration::from_secs(2 * 86_400)));
        assert_eq!(c.cache.max_object_bytes, Size(1000));
        assert_eq!(c.cache.disk_bytes, Size(20 << 30));
        assert_eq!(c.fetch.allow_networks, vec!["127.0.0.2/32".parse::<IpNet>().unwrap()]);
        assert_eq!(c.fetch.max_redirects, 2);
        let token = "12345678901234567890123456789012";
        assert_eq!(c.server.admin_token, token, "a numeric-looking string stays a string");
    }

    #[test]
    fn errors_name_the_key() {
        let key_of = |text: &str, e: &[(&str, &str)]| match Config::from_sources("t", text, env(e))
        {
            Err(ConfigError::Key { key, .. }) => key,
            other => panic!("expected a key error, got {other:?}"),
        };
        assert_eq!(key_of("[cache]\ndisk_byte = 1\n", &[]), "cache.disk_byte");
        assert_eq!(key_of("[cache]\ndisk_bytes = \"lots\"\n", &[]), "cache.disk_bytes");
        assert_eq!(key_of("", &[("PARASOL__FETCH__TIMEOUT", "soon")]), "fetch.timeout");
        assert_eq!(key_of("[signing]\nkeys = [\"short\"]\n", &[]), "signing.keys[0]");
        assert_eq!(key_of("", &[("PARASOL__NOPE", "1")]), "PARASOL__NOPE");
        assert!(matches!(
            Config::from_sources("t", "[cache", env(&[])),
            Err(ConfigError::Syntax { .. })
        ));
    }

    #[test]
    fn shared_tier_settings_are_checked_and_its_secret_hidden() {
        let key_of = |text: &str| match Config::from_sources("t", text, env(&[])) {
            Err(ConfigError::Key { key, .. }) => key,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(
            key_of("[shared]\nendpoint = \"ftp://s3.test\"\nbucket = \"b\"\n"),
            "shared.endpoint"
        );
        assert_eq!(key_of("[shared]\nendpoint = \"http://s3.test:3900\"\n"), "shared.bucket");
        let text = "[shared]\nendpoint = \"http://s3.test:3900\"\nbucket = \"b\"\n\
                    secret_access_key = \"s3cr3t-value\"\n";
        let config = Config::from_sources("t", text, env(&[])).unwrap();
        assert!(!config.to_redacted_toml().contains("s3cr3t-value"));
        let off = Config::from_sources("t", "", env(&[])).unwrap();
        assert!(off.shared.endpoint.is_empty(), "off by default");
    }

    #[test]
    fn errors_never_quote_a_secret() {
        let secret = "hunter2-hunter2-hunter2-hunter2-hunter2";
        let cases = [
            // A syntax error on the secret's own line.
            (format!("[server]\nadmin_token = \"{secret}\" x\n"), vec![]),
            (format!("[compat]\ncamo_key = \"{secret}\n"), vec![]),
            // The wrong type, from the file or from the environment.
            ("[server]\nadmin_token = 31337\n".to_string(), vec![]),
            (String::new(), vec![("PARASOL__SIGNING__KEYS", format!("[\"{secret}\""))]),
            // A secret of a numbered [[upstream]], of the wrong type.
            (
                "[[upstream]]\nprefix = \"/s/\"\n[upstream.s3]\nsecret_access_key = 31337\n"
                    .to_string(),
                vec![],
            ),
            ("[compat]\npictrs_secret = 31337\n".to_string(), vec![]),
        ];
        for (text, vars) in cases {
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let message = Config::from_sources("t", &text, env(&vars)).unwrap_err().to_string();
            assert!(!message.contains("hunter2") && !message.contains("31337"), "{message}");
        }
        let short = Config::from_sources("t", "[compat]\nakkoma_secret = \"short\"\n", env(&[]));
        let message = short.unwrap_err().to_string();
        assert!(
            message.contains("compat.akkoma_secret") && message.contains("32 bytes"),
            "{message}"
        );
        assert!(!message.contains("short\""), "{message}");
    }

    #[test]
    fn secrets_are_known_by_their_keys() {
        for key in [
            "server.admin_token",
            "signing.keys[1]",
            "compat.pictrs_secret",
            "upstream[0].s3.secret_access_key",
            "upstream[12].s3.secret_access_key",
        ] {
            assert!(is_secret(key), "{key}");
        }
        for key in ["upstream[0].s3.bucket", "upstream[x].s3.secret_access_key", "server.listen"] {
            assert!(!is_secret(key), "{key}");
        }
    }

    #[test]
    fn an_unsigned_pictrs_listener_stays_internal_unless_a_secret_guards_it() {
        let with = |extra: &str| Config::from_sources("t", extra, env(&[]));
        for internal in ["127.0.0.1:8091", "10.1.2.3:8091", "192.168.1.2:8091", "[fd00::1]:8091"] {
            assert!(with(&format!("[compat]\npictrs_listen = \"{internal}\"\n")).is_ok());
        }
        for public in ["0.0.0.0:8091", "203.0.113.7:8091", "[::]:8091", "[2001:db8::1]:8091"] {
            let refused = with(&format!("[compat]\npictrs_listen = \"{public}\"\n")).unwrap_err();
            assert!(refused.to_string().contains("pictrs_secret"), "{public}: {refused}");
            let secret = "a-secret-only-nginx-knows-0123456789";
            let guarded =
                format!("[compat]\npictrs_listen = \"{public}\"\npictrs_secret = \"{secret}\"\n");
            assert!(with(&guarded).is_ok(), "{public}");
        }
    }

    #[test]
    fn redacted_output_hides_secrets() {
        let text = "[signing]\nkeys = [\"0123456789abcdef0123456789abcdef\"]\n[server]\nadmin_token = \"token-token-token-token-token-tok\"\n";
        let shown = Config::from_sources("t", text, env(&[])).unwrap().to_redacted_toml();
        assert!(!shown.contains("0123456789abcdef") && !shown.contains("token-"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
