// grpcprobe calls net.Orchestrator/GetOrchestrator the way go-livepeer's gateway dials an
// orchestrator (server/rpc.go:startOrchestratorClient): grpc-go, a fresh connection, TLS
// with InsecureSkipVerify (or plaintext for an http:// URI), block until connected, 3 s.
// The request is hex on stdin; the reply is printed as hex, or "ERR <code>: <message>".
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// rawCodec passes serialized protobuf bytes through: the Python side builds the messages.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error { *(v.(*[]byte)) = append([]byte(nil), data...); return nil }
func (rawCodec) Name() string                       { return "proto" }

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: grpcprobe host:port https|http < request.hex")
		os.Exit(2)
	}
	line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	request, err := hex.DecodeString(strings.TrimSpace(line))
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad hex:", err)
		os.Exit(2)
	}
	creds := credentials.NewTLS(&tls.Config{InsecureSkipVerify: true})
	if os.Args[2] == "http" {
		creds = insecure.NewCredentials()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, os.Args[1], grpc.WithTransportCredentials(creds), grpc.WithBlock())
	if err != nil {
		fmt.Println("ERR dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	var reply []byte
	err = conn.Invoke(ctx, "/net.Orchestrator/GetOrchestrator", &request, &reply, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		s, _ := status.FromError(err)
		fmt.Printf("ERR %s: %s\n", s.Code(), s.Message())
		os.Exit(1)
	}
	fmt.Println(hex.EncodeToString(reply))
}
