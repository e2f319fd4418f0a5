//! Users and groups, read from `/etc/passwd` and `/etc/group` directly.
//!
//! The guest binary is linked statically against glibc, where NSS (`getpwnam`) cannot load its
//! modules, so the account databases are parsed here instead.

use std::path::{Path, PathBuf};

/// An account from the password database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell (may be empty).
    pub shell: String,
}

/// Why an account could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The database file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// No such user.
    #[error("user '{0}' does not exist")]
    NotFound(String),
}

/// Where the account databases live; tests and chroots can point elsewhere.
#[derive(Debug, Clone)]
pub struct AccountDb {
    passwd: PathBuf,
    group: PathBuf,
}

impl Default for AccountDb {
    fn default() -> Self {
        Self::new("/etc/passwd", "/etc/group")
    }
}

impl AccountDb {
    /// Uses the given passwd and group files.
    pub fn new(passwd: impl Into<PathBuf>, group: impl Into<PathBuf>) -> Self {
        Self {
            passwd: passwd.into(),
            group: group.into(),
        }
    }

    fn read(path: &Path) -> Result<String, UserError> {
        std::fs::read_to_string(path).map_err(|source| UserError::Read {
            path: path.to_owned(),
            source,
        })
    }

    /// Looks a user up by name.
    pub fn by_name(&self, name: &str) -> Result<User, UserError> {
        let text = Self::read(&self.passwd)?;
        parse_passwd(&text)
            .find(|u| u.name == name)
            .ok_or_else(|| UserError::NotFound(name.to_owned()))
    }

    /// Looks a user up by uid.
    pub fn by_uid(&self, uid: u32) -> Result<User, UserError> {
        let text = Self::read(&self.passwd)?;
        parse_passwd(&text)
            .find(|u| u.uid == uid)
            .ok_or_else(|| UserError::NotFound(uid.to_string()))
    }

    /// The name of a group id, if the group database knows it.
    pub fn group_name(&self, gid: u32) -> Option<String> {
        let text = Self::read(&self.group).ok()?;
        parse_group(&text)
            .find(|g| g.gid == gid)
            .map(|g| g.name.to_owned())
    }

    /// The name of a user id, if the password database knows it.
    pub fn user_name(&self, uid: u32) -> Option<String> {
        self.by_uid(uid).ok().map(|u| u.name)
    }

    /// The supplementary groups of `user`, always including its primary group first.
    pub fn groups_of(&self, user: &User) -> Vec<u32> {
        let mut gids = vec![user.gid];
        if let Ok(text) = Self::read(&self.group) {
            for g in parse_group(&text) {
                if g.members.iter().any(|m| *m == user.name) && !gids.contains(&g.gid) {
                    gids.push(g.gid);
                }
            }
        }
        gids
    }
}

/// The records of a colon-separated account file, comments skipped: each record's name and
/// the fields after its password.
fn records(text: &str) -> impl Iterator<Item = (&str, std::str::Split<'_, char>)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _password = f.next()?;
            Some((name, f))
        })
}

fn parse_passwd(text: &str) -> impl Iterator<Item = User> + '_ {
    records(text).filter_map(|(name, mut f)| {
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let _gecos = f.next()?;
        let home = f.next()?;
        let shell = f.next().unwrap_or("");
        if name.is_empty() {
            return None;
        }
        Some(User {
            name: name.to_owned(),
            uid,
            gid,
            home: PathBuf::from(if home.is_empty() { "/" } else { home }),
            shell: shell.to_owned(),
        })
    })
}

struct Group<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn parse_group(text: &str) -> impl Iterator<Item = Group<'_>> {
    records(text).filter_map(|(name, mut f)| {
        let gid = f.next()?.parse().ok()?;
        let members = f
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .collect();
        Some(Group { name, gid, members })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken line\nuser:x:1000:1000::/home/user:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            &group,
            "root:x:0:\nsudo:x:27:user,other\nuser:x:1000:\naudio:x:29:other\n",
        )
        .unwrap();
        let db = AccountDb::new(&passwd, &group);
        let user = db.by_name("user").unwrap();
        assert_eq!(user.uid, 1000);
        assert_eq!(user.home, PathBuf::from("/home/user"));
        assert_eq!(db.groups_of(&user), vec![1000, 27]);
        assert_eq!(db.by_uid(0).unwrap().name, "root");
        assert!(matches!(db.by_name("nobody"), Err(UserError::NotFound(_))));
        assert_eq!(db.group_name(27).as_deref(), Some("sudo"));
    }
}
