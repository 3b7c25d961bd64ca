//! Why a runner's configuration is refused before anything listens: each
//! case names the config key that is wrong and what to do about it.

use std::net::SocketAddr;

/// A configuration the runner refuses ([`crate::Config::check`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A number outside the range it must be in.
    #[error("{key} must be between {min} and {max}")]
    OutOfRange { key: String, min: u64, max: u64 },
    #[error("{key} must be at least {min}")]
    TooSmall { key: &'static str, min: u64 },
    /// A public listener without TLS.
    #[error(
        "refusing to listen on {listen} without TLS: agents' tokens and the management token would cross the network in clear. Set `tls = {{ cert = \"/etc/flotilla/runner.crt\", key = \"/etc/flotilla/runner.key\" }}` in the config (PEM files; see \"Secure a fleet\" in the README), or `tls = \"proxy\"` when a TLS-terminating proxy is in front, or listen on 127.0.0.1"
    )]
    NoTls { listen: SocketAddr },
    /// A public listener without a secret, or with a short one.
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    /// `mqtt.url` or `mqtt.prefix` cannot be used.
    #[error(transparent)]
    MqttSetting(#[from] flotilla_model::protocol::mqtt::SettingError),
    #[error(
        "refusing plain MQTT to {url}: credentials and reports would cross the network in clear; use mqtts://"
    )]
    PlainMqtt { url: String },
    #[error("mqtt.share_group {0:?} must be at most 64 letters, digits, - _ .")]
    ShareGroup(String),
    #[error("mqtt.client_id must be 1-128 characters")]
    ClientId,
    #[error("mqtt.client_cert and mqtt.client_key go together")]
    ClientCertWithoutKey,
    /// A `[[tokens]]` name that is not a name.
    #[error(transparent)]
    TokenName(flotilla_model::NameError),
    #[error("token name {0:?} is reserved")]
    TokenNameReserved(String),
    #[error("token {0:?}: sha256 must be 64 hex characters (`flotilla token digest` makes it)")]
    TokenDigest(String),
    #[error("token {0:?} is configured twice (`config` is the name of `token`)")]
    TokenTwice(String),
    /// A `release_keys` entry that is no key.
    #[error(transparent)]
    ReleaseKey(#[from] crate::signing::ReleaseKeyError),
    #[error(
        "require_signed_releases needs at least one key in release_keys (a minisign public key)"
    )]
    SignedWithoutKeys,
    /// A `[[hooks]]` entry that cannot work.
    #[error(transparent)]
    Hook(#[from] crate::hooks::HookConfigError),
    #[error("hook {0:?} is configured twice")]
    HookTwice(String),
}

impl ConfigError {
    /// The config key that is wrong (`http.idle_timeout_seconds`,
    /// `tokens`, `hooks`, `mqtt.url`, ...).
    pub fn key(&self) -> &str {
        use crate::secret::SecretError;
        use flotilla_model::protocol::mqtt::SettingError;
        match self {
            ConfigError::OutOfRange { key, .. } => key,
            ConfigError::TooSmall { key, .. } => key,
            ConfigError::NoTls { .. } => "tls",
            ConfigError::Secret(SecretError::Missing { key, .. })
            | ConfigError::Secret(SecretError::Short { key, .. }) => key,
            ConfigError::MqttSetting(SettingError::Prefix(_)) => "mqtt.prefix",
            ConfigError::MqttSetting(SettingError::Url { .. }) | ConfigError::PlainMqtt { .. } => {
                "mqtt.url"
            }
            ConfigError::ShareGroup(_) => "mqtt.share_group",
            ConfigError::ClientId => "mqtt.client_id",
            ConfigError::ClientCertWithoutKey => "mqtt.client_cert",
            ConfigError::TokenName(_)
            | ConfigError::TokenNameReserved(_)
            | ConfigError::TokenDigest(_)
            | ConfigError::TokenTwice(_) => "tokens",
            ConfigError::ReleaseKey(_) => "release_keys",
            ConfigError::SignedWithoutKeys => "require_signed_releases",
            ConfigError::Hook(_) | ConfigError::HookTwice(_) => "hooks",
        }
    }
}
