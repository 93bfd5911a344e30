//! Scopes (docs/policy.md#scopes): what a virtual key may do.
//!
//! A key holds *grants* ([`Scope`]): an exact permission (`chat:write`), a
//! family wildcard (`keys:*`) or everything (`*`). A route requires one
//! [`Permission`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One concrete permission a route can require.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Permission {
    /// Make proxied calls.
    ChatWrite,
    /// Read usage records.
    UsageRead,
    /// Read audit events.
    AuditRead,
    /// Create, list, rotate and revoke keys and provider keys.
    KeysManage,
}

impl Permission {
    /// Every permission there is.
    pub const ALL: [Permission; 4] = [
        Permission::ChatWrite,
        Permission::UsageRead,
        Permission::AuditRead,
        Permission::KeysManage,
    ];

    /// The permissions that read or change what the management API and the
    /// dashboard show: a key holding none of them can only make calls.
    pub const MANAGEMENT: [Permission; 3] = [
        Permission::KeysManage,
        Permission::UsageRead,
        Permission::AuditRead,
    ];

    /// The scope string, e.g. `chat:write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ChatWrite => "chat:write",
            Permission::UsageRead => "usage:read",
            Permission::AuditRead => "audit:read",
            Permission::KeysManage => "keys:manage",
        }
    }

    fn family(self) -> &'static str {
        let s = self.as_str();
        s.split_once(':').map_or(s, |(f, _)| f)
    }
}

/// A scope grant held by a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Exactly one permission.
    Exact(Permission),
    /// Every permission of a family, written `family:*`.
    Family(&'static str),
    /// Everything, written `*`.
    All,
}

/// A scope string that names no known scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scope {0:?}; known scopes: chat:write, usage:read, audit:read, keys:manage, a family wildcard like keys:*, or *"
)]
pub struct UnknownScope(pub String);

impl Scope {
    /// Parses `chat:write`, `keys:*`, `*` and the like; anything else is an
    /// [`UnknownScope`] naming the input.
    pub fn parse(s: &str) -> Result<Scope, UnknownScope> {
        if s == "*" {
            return Ok(Scope::All);
        }
        if let Some(p) = Permission::ALL.iter().find(|p| p.as_str() == s) {
            return Ok(Scope::Exact(*p));
        }
        if let Some(family) = s.strip_suffix(":*")
            && let Some(p) = Permission::ALL.iter().find(|p| p.family() == family)
        {
            return Ok(Scope::Family(p.family()));
        }
        let shown: String = s.chars().take(64).collect();
        Err(UnknownScope(shown))
    }

    /// Whether this grant covers `perm`.
    pub fn allows(self, perm: Permission) -> bool {
        match self {
            Scope::All => true,
            Scope::Exact(p) => p == perm,
            Scope::Family(f) => perm.family() == f,
        }
    }

    /// The scope as written.
    pub fn to_string_lossless(self) -> String {
        match self {
            Scope::All => "*".to_owned(),
            Scope::Exact(p) => p.as_str().to_owned(),
            Scope::Family(f) => format!("{f}:*"),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_lossless())
    }
}

/// The set of grants a key holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// Parses every entry; the first unknown one is the error.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Scopes, UnknownScope> {
        let mut out = Vec::with_capacity(items.len());
        for s in items {
            let scope = Scope::parse(s.as_ref())?;
            if !out.contains(&scope) {
                out.push(scope);
            }
        }
        Ok(Scopes(out))
    }

    /// Builds a set from grants.
    pub fn from_scopes(scopes: impl IntoIterator<Item = Scope>) -> Scopes {
        let mut out = Vec::new();
        for s in scopes {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        Scopes(out)
    }

    /// Whether any grant covers `perm`.
    pub fn allows(&self, perm: Permission) -> bool {
        self.0.iter().any(|s| s.allows(perm))
    }

    /// Whether any of `perms` is granted.
    pub fn allows_any(&self, perms: &[Permission]) -> bool {
        perms.iter().any(|p| self.allows(*p))
    }

    /// Whether every permission `self` allows is allowed by `parent`.
    pub fn is_subset_of(&self, parent: &Scopes) -> bool {
        Permission::ALL
            .iter()
            .all(|p| !self.allows(*p) || parent.allows(*p))
    }

    /// The grants, in order.
    pub fn iter(&self) -> impl Iterator<Item = Scope> + '_ {
        self.0.iter().copied()
    }

    /// Whether no grant is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v: Vec<String> = self.0.iter().map(|x| x.to_string_lossless()).collect();
        v.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<String> = Vec::deserialize(d)?;
        Scopes::parse(&v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_match() {
        let s = Scopes::parse(&["chat:write", "keys:*"]).unwrap();
        assert!(s.allows(Permission::ChatWrite));
        assert!(s.allows(Permission::KeysManage));
        assert!(!s.allows(Permission::UsageRead));
        assert!(Scopes::parse(&["*"]).unwrap().allows(Permission::AuditRead));
    }

    #[test]
    fn unknown_scopes_are_named() {
        for bad in [
            "chat:read",
            "keys",
            "admin",
            "",
            "*:*",
            "chat:write ",
            "CHAT:WRITE",
            "nope:*",
        ] {
            let e = Scopes::parse(&["usage:read", bad]).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn subsets() {
        let parent = Scopes::parse(&["chat:write", "usage:*"]).unwrap();
        assert!(
            Scopes::parse(&["chat:write"])
                .unwrap()
                .is_subset_of(&parent)
        );
        assert!(
            Scopes::parse(&["usage:read"])
                .unwrap()
                .is_subset_of(&parent)
        );
        assert!(!Scopes::parse(&["*"]).unwrap().is_subset_of(&parent));
        assert!(
            !Scopes::parse(&["keys:manage"])
                .unwrap()
                .is_subset_of(&parent)
        );
        let all = Scopes::parse(&["*"]).unwrap();
        assert!(
            Scopes::parse(&["keys:*", "chat:write"])
                .unwrap()
                .is_subset_of(&all)
        );
    }
}
