//! Which linear layers get an adapter: PEFT's `target_modules` semantics.
//! A list matches a module whose path equals a name or ends with `.name`; a string is a
//! regex that must match the whole path; `all-linear` is every linear layer but the LM head.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    /// A regex, or the literal `all-linear`.
    Pattern(String),
}

impl TargetModules {
    /// Parses the CLI / TOML form: `all-linear`, a comma list of names, or a regex
    /// (anything holding regex metacharacters).
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(Error::config("target_modules", "is empty"));
        }
        if spec == "all-linear" {
            return Ok(TargetModules::Pattern(spec.into()));
        }
        if spec.chars().any(|c| "*()[]|^$\\+?{}".contains(c)) {
            regex::Regex::new(&format!("^(?:{spec})$"))
                .map_err(|e| Error::config("target_modules", format!("invalid regex: {e}")))?;
            return Ok(TargetModules::Pattern(spec.into()));
        }
        Ok(TargetModules::Names(
            spec.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        ))
    }

    /// A matcher over module paths such as `model.layers.3.self_attn.q_proj`.
    pub fn matcher(&self) -> Result<Matcher> {
        Ok(match self {
            TargetModules::Names(n) => Matcher::Names(n.clone()),
            TargetModules::Pattern(p) if p == "all-linear" => Matcher::AllLinear,
            TargetModules::Pattern(p) => Matcher::Regex(
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| Error::config("target_modules", format!("invalid regex: {e}")))?,
            ),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            TargetModules::Names(n) => n.join(","),
            TargetModules::Pattern(p) => p.clone(),
        }
    }
}

pub enum Matcher {
    Names(Vec<String>),
    Regex(regex::Regex),
    AllLinear,
}

impl Matcher {
    /// `all-linear`: the caller also leaves out the model's output heads.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, Matcher::AllLinear)
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Matcher::Regex(r) => r.is_match(path),
            Matcher::AllLinear => path != "lm_head" && !path.ends_with(".lm_head"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_regex_and_all_linear() {
        let q = "model.layers.0.self_attn.q_proj";
        let up = "model.layers.1.mlp.up_proj";
        let m = TargetModules::parse("q_proj, v_proj")
            .unwrap()
            .matcher()
            .unwrap();
        assert!(m.matches(q) && !m.matches(up) && !m.matches("model.layers.0.self_attn.xq_proj"));
        let m = TargetModules::parse(r".*\.layers\.1\..*_proj")
            .unwrap()
            .matcher()
            .unwrap();
        assert!(!m.matches(q) && m.matches(up));
        let m = TargetModules::parse("all-linear")
            .unwrap()
            .matcher()
            .unwrap();
        assert!(m.matches(q) && m.matches(up) && !m.matches("lm_head"));
        assert!(TargetModules::parse("(").is_err());
        assert!(TargetModules::parse(" ").is_err());
    }
}
