//! The policy the configuration role gives this machine (`ripcord policy assign`, issue
//! 15), as the process server pushes it on the control stream (`PolicyUpdate`, protocol
//! 6): while a policy is assigned, its settings override the configuration file's; when
//! it is taken away (or never came: an older server), the file's apply again. A change
//! takes effect at the agent's next round, without a restart.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use ripcord_proto::PolicyUpdate;

/// The last policy update the server sent, shared between the control stream and the
/// producer.
#[derive(Clone, Debug, Default)]
pub struct SharedPolicy(Arc<Mutex<Option<PolicyUpdate>>>);

impl SharedPolicy {
    /// Takes the server's update; logs what changed.
    pub fn set(&self, update: PolicyUpdate) {
        let mut current = self.0.lock().expect("policy lock");
        if current.as_ref() == Some(&update) {
            return;
        }
        if update.assigned {
            tracing::info!(
                app_interval_secs = update.app_interval_secs,
                "the configuration role's policy for this machine sets application-consistent \
                 points every {} (overriding app-interval-secs)",
                if update.app_interval_secs == 0 {
                    "never".to_owned()
                } else {
                    format!("{} s", update.app_interval_secs)
                }
            );
        } else if current.is_some_and(|c| c.assigned) {
            tracing::info!(
                "this machine no longer has a policy: the configuration file's settings apply"
            );
        }
        *current = Some(update);
    }

    /// How often to take application-consistent points: the policy's interval while one
    /// is assigned, else `configured_secs` (the file's `app-interval-secs`); `None` for
    /// never.
    pub fn app_interval(&self, configured_secs: u64) -> Option<Duration> {
        let secs = match *self.0.lock().expect("policy lock") {
            Some(PolicyUpdate {
                assigned: true,
                app_interval_secs,
            }) => u64::from(app_interval_secs),
            _ => configured_secs,
        };
        (secs > 0).then(|| Duration::from_secs(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_overrides_the_file_while_assigned() {
        let p = SharedPolicy::default();
        assert_eq!(p.app_interval(0), None, "no policy, none configured");
        assert_eq!(p.app_interval(30), Some(Duration::from_secs(30)));
        p.set(PolicyUpdate {
            assigned: true,
            app_interval_secs: 3600,
        });
        assert_eq!(p.app_interval(30), Some(Duration::from_secs(3600)));
        p.set(PolicyUpdate {
            assigned: true,
            app_interval_secs: 0,
        });
        assert_eq!(p.app_interval(30), None, "the policy says never");
        p.set(PolicyUpdate {
            assigned: false,
            app_interval_secs: 0,
        });
        assert_eq!(p.app_interval(30), Some(Duration::from_secs(30)));
    }
}
