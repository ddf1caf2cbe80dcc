//! The YAML shape of one config file, exactly as an operator writes it.
//!
//! The fields are envoyproxy/ratelimit's, plus meshlimit's own (`algorithm`). Unknown fields
//! are rejected rather than ignored: a typo like `request_per_unit` must not silently become
//! "no limit" or a limit of 0.

use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub domain: Option<Spanned<String>>,
    #[serde(default)]
    pub descriptors: Vec<DescriptorEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorEntry {
    pub key: Option<Spanned<String>>,
    pub value: Option<Spanned<String>>,
    pub rate_limit: Option<Spanned<RateLimitBlock>>,
    #[serde(default)]
    pub descriptors: Vec<DescriptorEntry>,
    #[serde(default)]
    pub shadow_mode: bool,
    #[serde(default)]
    pub detailed_metric: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBlock {
    pub unit: Option<Spanned<String>>,
    pub requests_per_unit: Option<Spanned<i64>>,
    #[serde(default)]
    pub unlimited: bool,
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub replaces: Vec<Replaces>,
    pub algorithm: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replaces {
    pub name: Option<Spanned<String>>,
}
