use crate::id::{IdError, SandboxId};

/// A sandbox-plane host name of the form `{port}-{sandboxID}.{domain}`, as the E2B SDKs build it
/// when no sandbox URL is configured (for example `49983-i8x2kq0ab.sandbox.example.com`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSandboxHost {
    pub port: u16,
    pub sandbox_id: SandboxId,
    pub domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostParseError {
    #[error("host {host:?} has no domain after its first label")]
    NoDomain { host: String },
    #[error("host {host:?}: first label is not `{{port}}-{{sandboxID}}`")]
    NoPortPrefix { host: String },
    #[error("host {host:?}: {port:?} is not a port between 1 and 65535")]
    BadPort { host: String, port: String },
    #[error("host {host:?}: {source}")]
    BadSandboxId { host: String, source: IdError },
}

impl PortSandboxHost {
    /// Parses a `Host` header value. A trailing `:port` of the listener is ignored.
    pub fn parse(host: &str) -> Result<Self, HostParseError> {
        let err_host = || host.to_owned();
        let name = strip_listener_port(host);
        let (label, domain) = name
            .split_once('.')
            .filter(|(_, d)| !d.is_empty())
            .ok_or_else(|| HostParseError::NoDomain { host: err_host() })?;
        let (port, id) = label
            .split_once('-')
            .ok_or_else(|| HostParseError::NoPortPrefix { host: err_host() })?;
        let port_num = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| HostParseError::BadPort {
                host: err_host(),
                port: port.to_owned(),
            })?;
        let sandbox_id = SandboxId::new(id).map_err(|source| HostParseError::BadSandboxId {
            host: err_host(),
            source,
        })?;
        Ok(Self {
            port: port_num,
            sandbox_id,
            domain: domain.to_owned(),
        })
    }
}

fn strip_listener_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_id_and_domain() {
        let h = PortSandboxHost::parse("49983-i8x2kq0ab.sandbox.example.com").ok();
        let h = h.as_ref();
        assert_eq!(h.map(|h| h.port), Some(49983));
        assert_eq!(h.map(|h| h.sandbox_id.as_str()), Some("i8x2kq0ab"));
        assert_eq!(h.map(|h| h.domain.as_str()), Some("sandbox.example.com"));
    }

    #[test]
    fn ignores_the_listener_port() {
        let h = PortSandboxHost::parse("49999-abc.localhost:3000");
        assert_eq!(
            h.map(|h| (h.port, h.domain)).ok(),
            Some((49999, "localhost".into()))
        );
    }

    #[test]
    fn rejects_hosts_outside_the_grammar() {
        assert!(matches!(
            PortSandboxHost::parse("localhost:3000"),
            Err(HostParseError::NoDomain { .. })
        ));
        assert!(matches!(
            PortSandboxHost::parse("api.example.com"),
            Err(HostParseError::NoPortPrefix { .. })
        ));
        assert!(matches!(
            PortSandboxHost::parse("0-abc.example.com"),
            Err(HostParseError::BadPort { .. })
        ));
        assert!(matches!(
            PortSandboxHost::parse("70000-abc.example.com"),
            Err(HostParseError::BadPort { .. })
        ));
        assert!(matches!(
            PortSandboxHost::parse("+80-abc.example.com"),
            Err(HostParseError::BadPort { .. })
        ));
        assert!(matches!(
            PortSandboxHost::parse("49983-ABC.example.com"),
            Err(HostParseError::BadSandboxId { .. })
        ));
        assert!(matches!(
            PortSandboxHost::parse("49983-abc."),
            Err(HostParseError::NoDomain { .. })
        ));
    }
}
