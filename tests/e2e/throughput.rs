//! What the fast paths must not change: notifies sent at the same time share
//! one store write, and a poll that follows an answer at once may skip the
//! store read; neither may lose, mix up or reorder a message.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn notifies_sent_at_once_keep_their_ids_and_each_users_order() {
    let s = Server::start();
    let users = ["a@example.com", "b@example.com", "c@example.com"];
    let sids: Vec<String> = users.iter().map(|u| s.sid(u)).collect();
    let d_sid = s.sid("d@example.com");
    // Each user's messages go one after the other; the users' streams, and
    // a batch and a deduplicated message, all at the same time.
    let stream = |user: &'static str| {
        let s = &s;
        async move {
            let mut ids = Vec::new();
            for i in 0..15 {
                let a = s.mail(user, &format!("{user} {i}")).await;
                ids.push(a.body["ids"][0].as_str().unwrap().to_owned());
            }
            ids
        }
    };
    let extra = async {
        let batch = json!({"messages": [
            {"user": "d@example.com", "type": 70, "data": {"subject": "d 0"}},
            {"user": "d@example.com", "type": 70, "data": {"subject": "d 1"}},
        ]});
        let keyed = json!({"user": "d@example.com", "type": 70, "dedupKey": "k",
                           "data": {"subject": "d keyed"}});
        let (a, b) = tokio::join!(s.notify(batch), s.notify(keyed));
        assert_eq!(a.status, StatusCode::ACCEPTED);
        assert_eq!(b.status, StatusCode::ACCEPTED);
    };
    let (a, b, c, ()) = tokio::join!(stream(users[0]), stream(users[1]), stream(users[2]), extra);
    for ((user, sid), ids) in users.iter().zip(&sids).zip([a, b, c]) {
        let a = s.poll(sid, "timeout=0").await;
        let want: Vec<String> = (0..15).map(|i| format!("{user} {i}")).collect();
        assert_eq!(a.subjects(), want);
        let got: Vec<String> = a.body["msg"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, ids, "ids of {user}");
    }
    let d = s.poll(&d_sid, "timeout=0").await;
    let mut subjects = d.subjects();
    subjects.sort();
    assert_eq!(subjects, ["d 0", "d 1", "d keyed"]);
}

#[tokio::test]
async fn a_poll_right_after_an_answer_gets_what_came_in_between() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    s.mail("alice@example.com", "first").await;
    let a = s.poll(&sid, "timeout=0").await;
    assert_eq!(a.subjects(), ["first"]);
    // Nothing new: answered empty, and the server now knows it.
    let b = s
        .poll(&sid, &format!("timeout=0&cursor={}", a.cursor()))
        .await;
    assert_eq!(b.c(), 0);
    s.mail("alice@example.com", "second").await;
    let c = s
        .poll(&sid, &format!("timeout=0&cursor={}", b.cursor()))
        .await;
    assert_eq!(c.subjects(), ["second"]);
    // A held poll after that is woken by the next one.
    let held = tokio::spawn({
        let url = s.public_url(&format!(
            "/pns/poll?sid={sid}&timeout=20&cursor={}",
            c.cursor()
        ));
        let http = s.http.clone();
        async move { answer(http.get(url).send().await.unwrap()).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    s.mail("alice@example.com", "third").await;
    assert_eq!(held.await.unwrap().subjects(), ["third"]);
}
