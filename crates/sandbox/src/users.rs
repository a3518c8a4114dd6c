//! Resolving `user[:group]` against the sandbox's own /etc/passwd and /etc/group (read inside the
//! sandbox, after pivot_root, so the image's database is used, never the host's).

/// Credentials a process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).map_or_else(|| "/".into(), ToString::to_string),
            })
        })
        .collect()
}

/// (name, gid, members) per line of /etc/group.
fn groups(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let members = f.get(3).map(|m| m.split(',').filter(|s| !s.is_empty()).map(String::from).collect());
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, members.unwrap_or_default()))
        })
        .collect()
}

/// Resolves `spec` (`None` = root) with the given passwd and group file contents.
pub fn resolve_with(spec: Option<&str>, passwd_text: &str, group_text: &str) -> Result<User, String> {
    let users = passwd(passwd_text);
    let groups = groups(group_text);
    let (user_part, group_part) = match spec.unwrap_or("0") {
        s if s.contains(':') => {
            let (u, g) = s.split_once(':').expect("contains ':'");
            (u, Some(g))
        }
        s => (s, None),
    };
    let entry = users.iter().find(|e| e.name == user_part);
    let (uid, mut gid, home, name) = match (entry, user_part.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, e.home.clone(), Some(e.name.clone())),
        (None, Ok(uid)) => match users.iter().find(|e| e.uid == uid) {
            Some(e) => (uid, e.gid, e.home.clone(), Some(e.name.clone())),
            None => (uid, uid, "/".to_string(), None),
        },
        (None, Err(_)) => return Err(format!("unknown user {user_part:?} (not in the sandbox's /etc/passwd)")),
    };
    if let Some(g) = group_part {
        gid = match (groups.iter().find(|(n, _, _)| n == g), g.parse::<u32>()) {
            (Some((_, id, _)), _) => *id,
            (None, Ok(id)) => id,
            (None, Err(_)) => return Err(format!("unknown group {g:?} (not in the sandbox's /etc/group)")),
        };
    }
    if uid >= crate::userns::IDS_PER_SANDBOX || gid >= crate::userns::IDS_PER_SANDBOX {
        return Err(format!("ids above {} are not mapped in the sandbox", crate::userns::IDS_PER_SANDBOX - 1));
    }
    let mut all = vec![gid];
    if group_part.is_none() {
        if let Some(name) = name {
            all.extend(groups.iter().filter(|(_, _, m)| m.contains(&name)).map(|(_, id, _)| *id));
        }
    }
    all.dedup();
    Ok(User { uid, gid, groups: all, home })
}

/// Resolves `spec` with the current root's /etc/passwd and /etc/group (missing files = empty).
pub fn resolve(spec: Option<&str>) -> Result<User, String> {
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    resolve_with(spec, &read("/etc/passwd"), &read("/etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nalice:x:1000:\ndocker:x:999:alice\n";

    #[test]
    fn root_by_default() {
        let u = resolve_with(None, PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn named_user_gets_supplementary_groups() {
        let u = resolve_with(Some("alice"), PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.groups.clone()), (1000, 1000, vec![1000, 999]));
    }

    #[test]
    fn numeric_ids_need_no_entry() {
        let u = resolve_with(Some("4242:77"), PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.groups.clone()), (4242, 77, vec![77]));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(resolve_with(Some("bob"), PASSWD, GROUP).unwrap_err().contains("unknown user"));
        assert!(resolve_with(Some("alice:nogroup"), PASSWD, GROUP).unwrap_err().contains("unknown group"));
        assert!(resolve_with(Some("70000"), PASSWD, GROUP).unwrap_err().contains("not mapped"));
    }
}
