//! A control plane killed with SIGKILL in the middle of a burst of applies restarts at a
//! consistent version holding every apply it acknowledged (and at most the one that was in
//! flight), never a half-written store.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

fn doc(i: usize) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: burst-{i}\nspec:\n  selector: spiffe://cluster.local/ns/n{i}/sa/svc\n  rules:\n    - to:\n        - ports: [{}]\n",
        1000 + i
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_of_applies_leaves_a_consistent_store() {
    for round in 0..3 {
        let mut control = Control::start(&[]);
        let client = control.client();
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let in_flight = Arc::new(Mutex::new(None));
        let burst = {
            let (acked, in_flight) = (acked.clone(), in_flight.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    *in_flight.lock().unwrap() = Some(format!("burst-{i}"));
                    match client.apply_policies(doc(i)).await {
                        Ok(out) => {
                            assert_eq!(out.created, [format!("burst-{i}")]);
                            acked.lock().unwrap().insert(format!("burst-{i}"));
                        }
                        Err(_) => return, // the control plane died mid-call
                    }
                }
            })
        };
        // Let some applies land, then kill at a moment that varies per round.
        while acked.lock().unwrap().len() < 10 + round * 7 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_micros(300 * round as u64)).await;
        control.kill();
        burst.await.unwrap();

        control.restart();
        let list = control.client().list_policies().await.unwrap();
        let stored: BTreeSet<String> = list.policies.iter().map(|p| p.name.clone()).collect();
        let acked = acked.lock().unwrap().clone();
        let extra: Vec<_> = stored.difference(&acked).collect();
        assert!(acked.is_subset(&stored), "round {round}: acknowledged applies lost: {:?}", acked.difference(&stored));
        assert!(
            extra.is_empty() || (extra.len() == 1 && Some(extra[0]) == in_flight.lock().unwrap().as_ref()),
            "round {round}: unexpected policies {extra:?}"
        );
        assert_eq!(list.version as usize, stored.len(), "round {round}: one version per apply, no gaps");
        let audit = control.client().audit(0).await.unwrap();
        assert_eq!(audit.len(), stored.len(), "round {round}: one audit line per applied change");
        assert_eq!(audit.last().map(|a| a.version), Some(list.version));
    }
}
