//! Table names and SQL quoting.
//!
//! Every identifier that comes from configuration or from the source's catalog is
//! quoted before it reaches SQL; nothing here trusts a name to be "simple".

use serde::{Deserialize, Serialize};
use std::fmt;

/// A table, optionally schema-qualified (PostgreSQL has schemas, SQLite does not here).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TableName {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    pub fn new(schema: Option<&str>, name: &str) -> Self {
        Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        }
    }

    /// The quoted, schema-qualified name for SQL: `"public"."AndroidRequests_report"`.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }

    /// A name safe to use as one path component inside a bundle: the display name
    /// with everything outside `[A-Za-z0-9_.-]` percent-encoded, so that `/`, `..`
    /// or control characters in a table name can never form a path.
    pub fn file_stem(&self) -> String {
        let mut out = String::new();
        for b in self.to_string().bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        if out.starts_with('.') {
            out.replace_range(0..1, "%2E");
        }
        out
    }
}

/// `schema.name` unquoted, as operators write it in configuration.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A connection URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let at = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(at);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Quotes an identifier for PostgreSQL and SQLite alike: `a"b` becomes `"a""b"`.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a string literal (standard SQL, no backslash escapes): `it's` becomes `'it''s'`.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        let t = TableName::new(Some("public"), "AndroidRequests_report");
        assert_eq!(t.quoted(), "\"public\".\"AndroidRequests_report\"");
        assert_eq!(t.to_string(), "public.AndroidRequests_report");
    }

    #[test]
    fn file_stem_cannot_escape() {
        let t = TableName::new(None, "../etc/passwd");
        assert_eq!(t.file_stem(), "%2E.%2Fetc%2Fpasswd");
        assert!(!t.file_stem().contains('/'));
    }
}
