// The node's sandbox image: a pause program with no dependency (build.sh node).
module saleslayer-operator/testenv/pause

go 1.26.0
